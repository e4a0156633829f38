"""Records per second the training loader delivers: SupervisedDataset (images decoded and
processed) + Collator through a torch DataLoader with `--num_workers` workers, shuffled as the
Trainer does. No model runs: this is the ceiling the data puts on training speed.

    python -m scripts.bench_data --num_workers 0                  # the demo set and tiny base
    python -m scripts.bench_data --data_path train.jsonl --image_folder images/ \
        --llm_model PATH --vision_model PATH --num_workers 8 --batch_size 16

(from the repository's root, as every script in scripts/ runs).

With no --data_path it reads configs/demo.yaml's data and base, building them (seeded, no
download) when missing, as train.py's demo does. Prints one row of key=value fields:
records_per_s, records, batches, batch_size, num_workers, images_per_record, seconds, setup_s.
"""

import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser

from config import DataArguments, ModelArguments
from constants import DEMO_CONFIG
from data.dataset import Collator, supervised_dataset
from fixtures.demo_assets import make_missing_demo_assets
from model.build import load_tokenizer_and_image_processor
from model.vlm import IMAGE_TOKEN_INDEX
from scripts.check_data import num_image_tokens


@dataclass
class BenchArguments:
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes."})
    batch_size: int = field(default=16, metadata={"help": "Records per batch (the demo's)."})
    batches: int = field(default=400, metadata={"help": "Batches timed."})
    warmup_batches: int = field(default=4, metadata={"help": "Batches before the clock starts (worker start-up)."})


def demo_words() -> list[str]:
    """configs/demo.yaml's model and data settings as command-line words."""
    with open(DEMO_CONFIG) as f:
        settings = yaml.safe_load(f)
    known = set(ModelArguments.__dataclass_fields__) | set(DataArguments.__dataclass_fields__)
    words = []
    for key, value in settings.items():
        if key in known:
            words += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return words


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data_path" not in argv:
        argv = demo_words() + argv  # the command line still wins
    parser = HfArgumentParser((ModelArguments, DataArguments, BenchArguments), allow_abbrev=False)
    model_args, data_args, bench = parser.parse_args_into_dataclasses(args=argv)
    make_missing_demo_assets(model_args, data_args)  # as train.py: the demo's, if absent

    start = time.perf_counter()
    tokenizer, image_processor = load_tokenizer_and_image_processor(model_args, data_args.chat_template)
    dataset = supervised_dataset(
        data_args.data_path, data_args.image_folder, tokenizer, num_image_tokens(model_args), IMAGE_TOKEN_INDEX,
        data_args.max_length, num_frames=data_args.num_frames,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=bench.batch_size, shuffle=True, num_workers=bench.num_workers,
        collate_fn=Collator(tokenizer.pad_token_id, image_processor), persistent_workers=bench.num_workers > 0,
    )
    setup_s = time.perf_counter() - start

    records = images = batches = 0
    batches_wanted = bench.warmup_batches + bench.batches
    clock = None
    while batches < batches_wanted:  # as many epochs as it takes
        for batch in loader:
            if batches == bench.warmup_batches:
                clock = time.perf_counter()
            if batches >= bench.warmup_batches:
                records += batch["input_ids"].shape[0]
                images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
            batches += 1
            if batches == batches_wanted:
                break
    seconds = time.perf_counter() - clock
    row = {
        "records_per_s": round(records / seconds, 1), "records": records, "batches": bench.batches,
        "batch_size": bench.batch_size, "num_workers": bench.num_workers,
        "images_per_record": round(images / max(records, 1), 2), "seconds": round(seconds, 3),
        "setup_s": round(setup_s, 2),
    }
    print("bench_data: " + " ".join(f"{k}={v}" for k, v in row.items()))
    return row


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
