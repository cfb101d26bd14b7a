"""TokenizerConfig: defaults validate, cross-field rules fail with the key and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.tokenizer.config import LossConfig, QuantizerConfig, TokenizerConfig


def test_defaults_validate_and_resolve_code_dim() -> None:
    cfg = TokenizerConfig()
    assert cfg.code_dim == cfg.autoencoder.z_channels
    assert TokenizerConfig(quantizer={"code_dim": 8}).code_dim == 8
    fsq = TokenizerConfig(quantizer={"kind": "fsq", "levels": [8, 4, 4], "codebook_size": 128})
    assert fsq.code_dim == 3 and fsq.codebook_size == 128


def test_fsq_codebook_size_must_match_levels() -> None:
    with pytest.raises(ValidationError, match=r"codebook_size=1024 must equal prod\(levels\)=1000"):
        QuantizerConfig(kind="fsq")


def test_fsq_levels_and_code_dim() -> None:
    with pytest.raises(ValidationError, match="levels=\\[8, 1\\] must be one or more integers >= 2"):
        QuantizerConfig(kind="fsq", levels=(8, 1), codebook_size=8)
    with pytest.raises(ValidationError, match="code_dim=4 must be null or len\\(levels\\)=3"):
        QuantizerConfig(kind="fsq", levels=(8, 4, 4), codebook_size=128, code_dim=4)


def test_other_rules() -> None:
    with pytest.raises(ValidationError, match="tau_end=2.0 must not exceed tau_start=1.0"):
        QuantizerConfig(kind="gumbel", tau_end=2.0)
    with pytest.raises(ValidationError, match="nothing to reconstruct"):
        LossConfig(recon_weight=0, perceptual_weight=0)
    with pytest.raises(ValidationError, match="extra"):
        TokenizerConfig(quantizer={"kind": "vq", "codebok_size": 8})
    with pytest.raises(ValidationError, match="'vq', 'gumbel' or 'fsq'"):
        QuantizerConfig(kind="rvq")


def test_json_round_trip() -> None:
    cfg = TokenizerConfig(quantizer={"kind": "gumbel", "codebook_size": 64}, loss={"disc": {"layers": 2}})
    assert TokenizerConfig.model_validate(cfg.model_dump(mode="json")) == cfg
