"""vLLM's greedy answers to chat requests, sent to an exported folder as a client sends them.

    .venv-vllm/bin/python scripts/vllm_answers.py --model outputs/demo-hf --requests requests.jsonl \
        --output answers.jsonl

Runs in vLLM's own environment (`bash scripts/vllm_env.sh` builds .venv-vllm), so it imports
nothing of this repository. Each line of --requests is `{"id": ..., "messages": [...]}`, messages in
the OpenAI chat format that `vllm serve`'s /v1/chat/completions takes: a turn's content is a list
of parts, `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` and
`{"type": "text", "text": ...}`. vLLM renders them through the folder's own chat template and
processor (`LLM.chat`, the code path of its server) and stops where the folder's
generation_config.json says. Each line of --output is `{"id": ..., "answer": ...}`.
tests/test_vllm.py compares these answers with infer.py's.
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="An exported folder (scripts/export_hf.py).")
    parser.add_argument("--requests", required=True, help="JSONL of {id, messages}.")
    parser.add_argument("--output", required=True, help="JSONL of {id, answer}.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="infer.py's default.")
    parser.add_argument("--max_model_len", type=int, default=1024)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)  # first: --help needs no vLLM
    # One process: the engine in this one (not a spawned engine process and a worker process, each
    # importing torch and vLLM again: ~90 s apiece on a busy 2-core machine).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    with open(args.requests) as f:
        requests = [json.loads(line) for line in f]
    llm = LLM(
        model=args.model,
        dtype="float32",  # the CPU tests' dtype (bf16 is ~50x slower on this CPU); as infer.py runs
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": max(count_images(r["messages"]) for r in requests)},
        seed=0,
        distributed_executor_backend="uni",
        # Eager: torch.compile of even a tiny model costs minutes on this CPU, for no test value.
        compilation_config={"mode": 0},
        enforce_eager=True,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    outputs = llm.chat([r["messages"] for r in requests], greedy, use_tqdm=False)
    with open(args.output, "w") as f:
        for request, output in zip(requests, outputs, strict=True):
            f.write(json.dumps({"id": request["id"], "answer": output.outputs[0].text}) + "\n")


def count_images(messages: list[dict]) -> int:
    return sum(
        part.get("type") == "image_url"
        for message in messages if isinstance(message["content"], list)
        for part in message["content"]
    )


if __name__ == "__main__":  # vLLM's default (a spawned engine process) re-imports this file: guard kept
    main()
