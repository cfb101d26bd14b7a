"""Stage `encode`: every split of data/processed -> token grids and latents in data/tokens/.

Batch inference on Ray Data with the tokenizer loaded once per actor; what the GPT and MaskGIT
priors and latent diffusion train on. The actors get the tokenizer's bytes and, with a
`storage.bucket`, read a large data/processed from the bucket: no node needs the checkout.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import load_stage
from components.data.shards import SPLITS, read_meta
from components.data.tokens import TOKENS_SCHEMA_VERSION, encode_split, write_token_split
from components.io import atomic_dir, weights_sha256, write_json
from components.stages import EncodeConfig
from components.tokenizer.export import load_vqgan
from pipelines.bucket import publish_data, use_bucket
from pipelines.lineage import repo_root
from pipelines.ray_start import init_ray
from pipelines.runtime import print_config, stage_run, tracking_uri

STAGE = "encode"
DATA, TOKENIZER, OUT = "data/processed", "models/tokenizer", "data/tokens"


def tokenizer_version(model_dir: Path, uri: str) -> dict[str, str]:
    """The tokenizer's content hash and, when registered, its MLflow registry version."""
    from components.registry.registry import list_versions, registered_name

    sha = weights_sha256(model_dir)
    name = registered_name("tokenizer")
    versions = [
        r["version"]
        for r in list_versions(tracking_uri=uri, name=name)
        if r["tags"].get("model_sha256") == sha
    ]
    return {
        "model_sha256": sha,
        "registered_model": name,
        "version": versions[-1] if versions else "unregistered",
    }


def main(*, params: Path, dry_run: bool = False) -> None:
    sections = load_stage(params, STAGE)
    cfg: EncodeConfig = sections[STAGE]
    root = repo_root()
    meta = read_meta(root / DATA)
    vqgan = load_vqgan(root / TOKENIZER)  # fail before Ray starts when it is missing
    f = vqgan.downsample_factor
    grid = (meta["image_size"] // f, meta["image_size"] // f)
    if dry_run:
        print_config(sections)
        return
    use_bucket(sections)  # before Ray starts: its endpoint reaches the read tasks
    with stage_run(STAGE, sections, data_deps=[DATA, TOKENIZER]) as run:
        init_ray(sections["ray"])
        published = publish_data(sections, root / DATA, splits=SPLITS)  # Ray Data's read tasks read it
        counts, shards = {}, {}
        with atomic_dir(root / OUT) as tmp:
            for split in SPLITS:
                batches = encode_split(
                    root / DATA,
                    split,
                    model_dir=root / TOKENIZER,
                    batch_size=cfg.batch_size,
                    num_actors=cfg.num_actors,
                    use_gpu=sections["train"].use_gpu,
                    published=published,
                )
                shards[split], counts[split] = write_token_split(
                    batches,
                    out_dir=tmp,
                    split=split,
                    grid=grid,
                    latent_dim=vqgan.config.code_dim,
                    shard_rows=cfg.shard_rows,
                )
                print(f"{STAGE}: {split}: {counts[split]} images -> {grid[0]}x{grid[1]} tokens")
            token_meta = {
                "schema_version": TOKENS_SCHEMA_VERSION,
                "grid": list(grid),
                "codebook_size": vqgan.codebook_size,
                "latent_channels": vqgan.config.code_dim,
                "downsample_factor": f,
                "image_size": meta["image_size"],
                "channels": meta["channels"],
                "num_classes": meta["num_classes"],
                "class_names": meta["class_names"],
                "counts": counts,
                "shards": shards,
                "tokenizer": tokenizer_version(root / TOKENIZER, tracking_uri(sections["mlflow"])),
                "data_content_hash": meta["content_hash"],
            }
            write_json(tmp / "meta.json", token_meta)
        run.log_metrics({f"num_{s}": float(n) for s, n in counts.items()})
        run.log_artifact(root / OUT / "meta.json")
    print(f"{STAGE}: wrote {sum(counts.values())} token grids to {OUT} ({json.dumps(counts)})")
