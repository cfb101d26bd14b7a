"""The "prior" generator family: export -> load_generator round trip, decoding, option and grid errors."""

from __future__ import annotations

import json

import pytest
import torch

from components.generators import TOKENIZER_DIR, Generator, load_generator
from components.prior import generator as prior_generator
from components.prior.config import PriorSamplingConfig
from components.prior.gpt import generate as gpt_generate
from components.prior.maskgit import generate as maskgit_generate
from components.prior.task import build_prior
from components.tokenizer.export import load_vqgan

GRID, K, CLASSES, IMAGE = (4, 4), 16, 3, (1, 16, 16)


def _export(helpers, tmp_path, *, kind: str, num_classes: int = CLASSES, grid=GRID, **sampling):
    tokenizer = helpers.tiny_vqgan(tmp_path / "tokenizer", codebook_size=K)
    prior = helpers.tiny_prior(kind)
    torch.manual_seed(1)
    model = build_prior(prior, grid=GRID, codebook_size=K, num_classes=num_classes)
    out = tmp_path / f"prior_{kind}"
    prior_generator.export(
        out,
        state=model.state_dict(),
        prior=prior,
        sampling=PriorSamplingConfig(**sampling),
        grid=grid,
        codebook_size=K,
        num_classes=num_classes,
        image_shape=IMAGE,
        tokenizer_dir=tokenizer,
    )
    return out, model.eval()


@pytest.mark.parametrize("kind", ["gpt", "maskgit"])
def test_round_trip_gives_identical_samples_and_images_in_range(helpers, tmp_path, kind: str) -> None:
    out, model = _export(helpers, tmp_path, kind=kind, guidance=2.0, top_k=8, steps=4)
    assert (out / TOKENIZER_DIR / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["family"] == "prior"
    gen = load_generator(out)
    # the protocol includes `device`: the judge draws its RNG there (a CPU one failed on CUDA)
    assert isinstance(gen, Generator)
    assert gen.device == torch.device("cpu")
    assert gen.num_classes == CLASSES and gen.image_shape == IMAGE
    expected = {"temperature": 1.0, "top_k": 8, "top_p": 1.0, "guidance": 2.0}
    expected |= {"use_cache": True} if kind == "gpt" else {"steps": 4, "choice_temperature": 4.5}
    assert gen.default_options == expected
    labels = torch.tensor([0, 1, 2, 0, 1])
    images = gen.sample(labels, generator=torch.Generator().manual_seed(3))
    assert images.shape == (5, *IMAGE) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    again = load_generator(out).sample(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(images, again)
    # the same as sampling the exported weights directly and decoding with the exported tokenizer
    generate = gpt_generate if kind == "gpt" else maskgit_generate
    tokens = generate(model, labels, generator=torch.Generator().manual_seed(3), **expected)
    direct = load_vqgan(out / TOKENIZER_DIR).decode_indices(tokens.view(5, *GRID)).clamp(-1, 1)
    torch.testing.assert_close(images, direct)
    other = gen.sample(labels, generator=torch.Generator().manual_seed(3), guidance=1.0, temperature=0.5)
    assert other.shape == images.shape and not torch.equal(other, images)  # options reach the sampler


def test_unconditional_generator_takes_a_count(helpers, tmp_path) -> None:
    out, _ = _export(helpers, tmp_path, kind="maskgit", num_classes=0)
    gen = load_generator(out)
    assert gen.num_classes == 0
    assert gen.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, *IMAGE)
    with pytest.raises(ValueError, match="unconditional"):
        gen.sample(torch.tensor([0]), generator=torch.Generator())
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional"):
        gen.sample(2, generator=torch.Generator(), guidance=2.0)
    with pytest.raises(ValueError, match="guidance=3.0 needs a class-conditional prior"):
        _export(helpers, tmp_path / "again", kind="gpt", num_classes=0, guidance=3.0)


def test_options_are_validated_with_one_line(helpers, tmp_path) -> None:
    out, _ = _export(helpers, tmp_path, kind="gpt")
    gen = load_generator(out)
    g = torch.Generator()
    cases = [
        (
            {"steps": 4},
            "prior/gpt: unknown sampling option 'steps'; valid: guidance, temperature, top_k, top_p, use_cache",
        ),
        ({"top_p": 1.5}, "top_p=1.5: must be a finite number in (0, 1]"),
        ({"temperature": 0.0}, "temperature=0.0: must be a finite number in (0, 10]"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError) as info:
            gen.sample(torch.tensor([0]), generator=g, **options)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        gen.sample(torch.tensor([3]), generator=g)


def test_grid_that_does_not_match_the_tokenizer_is_one_line(helpers, tmp_path) -> None:
    with pytest.raises(ValueError) as info:
        _export(helpers, tmp_path, kind="gpt", grid=(2, 2))
    assert str(info.value) == (
        "grid=(2, 2) does not match the tokenizer: images 16x16 with downsample factor 4 give a 4x4 grid"
    )
    out, _ = _export(helpers, tmp_path, kind="gpt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "image_shape": [1, 32, 32]}))
    with pytest.raises(ValueError, match=r"^grid=\(4, 4\) does not match the tokenizer: images 32x32"):
        load_generator(out)
