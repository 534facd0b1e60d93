"""Multi-node training as README shows it (torchrun --nnodes=2, c10d rendezvous), with two "nodes" of two
processes each on localhost over gloo that share no data folder: each node's first process alone readies its own
copy of the dataset (from the archive beside its default data folder, as a download would), only global rank 0
writes, and the four ranks end with the same weights."""
import os
import socket
import subprocess
import sys
import tarfile

import train

ROOT = train.Path(train.__file__).parent
FLAGS = ["--run-name", "mn", "--height", "32", "--width", "40", "--limit", "16", "--val-fraction", "0.005",
         "--epochs", "1", "--workers", "0", "--no-test", "--no-amp", "--batch-size", "2", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _archive(drinks, path):
    """The dataset as the published archive holds it (a drinks/ folder), uncompressed: JPEGs do not shrink."""
    with tarfile.open(path, "w") as tar:
        tar.add(drinks, arcname="drinks")


def test_two_nodes_with_their_own_data_train_the_same_weights(tmp_path, drinks):
    _archive(drinks, tmp_path / "drinks.tar")
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        (node / "dataset").mkdir(parents=True)
        (node / "dataset" / "drinks.tar.gz").symlink_to(tmp_path / "drinks.tar")  # the default path's neighbour
    env = {k: v for k, v in os.environ.items() if k != "DRINKS_DATA"}  # so each node uses its dataset/drinks
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=mn",
           str(ROOT / "train.py"), *FLAGS]
    procs = [subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in nodes]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    for node, (out, _) in zip(nodes, outputs):  # each node readied its own copy, in its first process alone
        assert (node / "dataset" / "drinks" / "segmentation_train.json").is_file()
        assert out.count("downloading the drinks dataset") == 1, out
    writers = [i for i, node in enumerate(nodes) if (node / "weights").exists()]
    assert len(writers) == 1  # global rank 0's node only (the rendezvous decides which)
    main = nodes[writers[0]]
    assert (main / "weights" / "mn" / "last.pt").is_file()
    assert not (nodes[1 - writers[0]] / "figures").exists()
    assert "the 4 processes end with the same weights" in outputs[writers[0]][0]
