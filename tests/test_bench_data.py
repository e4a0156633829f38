"""scripts/bench_data.py runs the real loader (workers, image decoding, collation) and prints one
row of fields; the speed itself is measured by hand (docs/data.md, "Loader throughput"), never asserted."""

from __future__ import annotations

from scripts import bench_data


def test_bench_data_prints_its_row(demo_data, tiny_base, capsys):
    bench_data.main([
        "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
        "--llm_model", tiny_base["llm"], "--vision_model", tiny_base["vision"], "--max_length", "256",
        "--num_workers", "1", "--batch_size", "4", "--batches", "3", "--warmup_batches", "1",
    ])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench_data: ")]
    row = dict(field.split("=") for field in line.removeprefix("bench_data: ").split())
    assert list(row) == ["records_per_s", "records", "batches", "batch_size", "num_workers",
                         "images_per_record", "seconds", "setup_s"]
    assert (row["records"], row["batches"], row["batch_size"], row["num_workers"]) == ("12", "3", "4", "1")
    assert row["images_per_record"] == "1.0"  # every demo record's image went through the collator
    assert float(row["records_per_s"]) > 0 and float(row["seconds"]) > 0
