"""benchmark.py runs and reports every field (its numbers are measurements, not asserted targets)."""
import benchmark


def test_benchmark_reports_every_field(drinks, capsys):
    args = benchmark.get_args_parser().parse_args([
        "--height", "32", "--width", "48", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
        "--data-path", str(drinks), "--workers", "0", "--data-images", "4", "--json"])
    r = benchmark.main(args)
    for key in ("train_img_s", "infer_img_s", "baseline_train_img_s", "baseline_infer_img_s", "gflops_per_img",
                "mfu", "data_img_s", "peak_mem_mb"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    # forward + backward costs about three forward passes
    assert 2.5 < r["train_gflops_per_img"] / r["gflops_per_img"] < 3.5
    assert '"train_img_s"' in capsys.readouterr().out
