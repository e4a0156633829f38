"""vLLM's greedy answers to chat requests, sent to exported folders as a client sends them.

    .venv-vllm/bin/python scripts/vllm_answers.py --model outputs/demo-hf --requests requests.jsonl \
        --output answers.jsonl [--model B --requests B.jsonl --output B_answers.jsonl ...]

Runs in vLLM's own environment (`bash scripts/vllm_env.sh` builds .venv-vllm), so it imports
nothing of this repository. Each line of --requests is `{"id": ..., "messages": [...]}`, messages in
the OpenAI chat format that `vllm serve`'s /v1/chat/completions takes: a turn's content is a list
of parts, `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` and
`{"type": "text", "text": ...}`. vLLM renders them through the folder's own chat template and
processor (`LLM.chat`, the code path of its server) and stops where the folder's
generation_config.json says. Each line of --output is `{"id": ..., "answer": ...}`.

--model/--requests/--output repeat: each triple is one job, all served by this one process (one
import of torch and vLLM, ~30-60 s on a busy 2-core machine, instead of one per folder). A folder
vLLM refuses writes its error to `<output>.error` and the next job still runs; the exit status is
then 1. tests/test_vllm.py compares these answers with infer.py's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, action="append", help="An exported folder (scripts/export_hf.py).")
    parser.add_argument("--requests", required=True, action="append", help="JSONL of {id, messages}.")
    parser.add_argument("--output", required=True, action="append", help="JSONL of {id, answer}.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="infer.py's default.")
    parser.add_argument("--max_model_len", type=int, default=1024)
    args = parser.parse_args(argv)
    if not len(args.model) == len(args.requests) == len(args.output):
        parser.error("give one --requests and one --output for each --model")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # first: --help needs no vLLM
    # One process: the engine in this one (not a spawned engine process and a worker process, each
    # importing torch and vLLM again: ~90 s apiece on a busy 2-core machine).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    failed = []
    for model, requests, output in zip(args.model, args.requests, args.output, strict=True):
        try:
            answer(model, requests, output, args.max_new_tokens, args.max_model_len)
        except Exception:  # this folder's refusal, kept for the caller; the other folders still run
            with open(output + ".error", "w") as f:
                f.write(traceback.format_exc())
            failed.append(model)
    if failed:
        print(f"vLLM failed on {failed}: see each --output's .error file", file=sys.stderr)
    return 1 if failed else 0


def answer(model: str, request_file: str, output: str, max_new_tokens: int, max_model_len: int) -> None:
    """Greedy answers of the folder `model` to each request of `request_file`, written to `output`."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    with open(request_file) as f:
        requests = [json.loads(line) for line in f]
    llm = None
    try:
        llm = LLM(
            model=model,
            dtype="float32",  # the CPU tests' dtype (bf16 is ~50x slower on this CPU); as infer.py runs
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max(count_images(r["messages"]) for r in requests)},
            seed=0,
            distributed_executor_backend="uni",
            # Eager: torch.compile of even a tiny model costs minutes on this CPU, for no test value.
            compilation_config={"mode": 0},
            enforce_eager=True,
        )
        greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = llm.chat([r["messages"] for r in requests], greedy, use_tqdm=False)
        with open(output, "w") as f:
            for request, out in zip(requests, outputs, strict=True):
                f.write(json.dumps({"id": request["id"], "answer": out.outputs[0].text}) + "\n")
    finally:
        # The next folder's engine starts in this process: this one's model and its distributed
        # state go first (vLLM's own way between engines of one process, as in its tests), also
        # when the engine failed halfway through starting (its half-made groups would refuse the next).
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()


def count_images(messages: list[dict]) -> int:
    return sum(
        part.get("type") == "image_url"
        for message in messages if isinstance(message["content"], list)
        for part in message["content"]
    )


if __name__ == "__main__":  # vLLM's default (a spawned engine process) re-imports this file: guard kept
    sys.exit(main())
