"""CPU seconds of the one data pass (data/one_pass.py) per record, in ONE process: what the pass
costs on a loaded machine, where wall seconds say little. The same N records of the LLaVA-shaped
set (bench/llava_shaped.py), the tiny base's tokenizer and template, the media decoded as a
first run decodes them.

    python -m bench.data_pass --records 5000
    python -m bench.data_pass --records 5000 --profile 25     # and cProfile's top 25 by own time

Prints the CPU seconds of the pass (`time.process_time`, this process only), those of its media
decoding (fixed: the 2,000 images), the rest per record, and that extrapolated to 200K records
(the per-record part only; on 2 cores, half of it in wall seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import tempfile
import time

from transformers import AutoTokenizer

import data.one_pass as one_pass
from bench.llava_shaped import make_llava_shaped
from data.chunk_check import PassSettings
from fixtures.synthetic import vocabulary
from fixtures.tiny_base import TINY_VISION, make_tiny_base

NUM_IMAGE_TOKENS = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2


def pass_settings(work: str) -> PassSettings:
    base_dir = os.path.join(work, "tiny-base")
    if not os.path.isdir(os.path.join(base_dir, "llm")):
        make_tiny_base(base_dir, vocabulary(), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(base_dir, "llm"))
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    return PassSettings(tokenizer, NUM_IMAGE_TOKENS, image_token_index, 2048, work, 8)


@contextlib.contextmanager
def _timed_media_checks():
    """Yields {"cpu_s"}: the CPU seconds of the pass's media decoding (2,000 images however many
    records: a fixed cost), kept apart from the per-record cost; the pass's own function after."""
    timed, check = {"cpu_s": 0.0}, one_pass.check_media_files

    def check_media_files(*args, **kwargs):
        start = time.process_time()
        try:
            return check(*args, **kwargs)
        finally:
            timed["cpu_s"] += time.process_time() - start

    one_pass.check_media_files = check_media_files
    try:
        yield timed
    finally:
        one_pass.check_media_files = check


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5_000)
    parser.add_argument("--work_dir", default="outputs/data-scale")
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    settings = pass_settings(work)
    path = make_llava_shaped(work, args.records)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    with _timed_media_checks() as media, tempfile.TemporaryDirectory() as folder:
        start = time.process_time()
        if profiler:
            profiler.enable()
        report = one_pass.run_pass(path, settings, folder, workers=1, show_progress=False)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - start
    per_record_ms = 1000 * (cpu - media["cpu_s"]) / report.num_records
    row = {"records": report.num_records, "usable": report.num_usable, "cpu_s": round(cpu, 2),
           "media_cpu_s": round(media["cpu_s"], 2),
           "cpu_ms_per_record": round(per_record_ms, 3),
           "cpu_s_200k": round(per_record_ms * 200, 1), "pass_s_200k_on_2_cores": round(per_record_ms * 100, 1)}
    print("data_pass " + " ".join(f"{k}={v}" for k, v in row.items()))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return row


if __name__ == "__main__":
    main()
