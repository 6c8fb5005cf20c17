"""Tests of ``data_tools.distributed``: shards as Dask tasks, tree-reduced.

A local Dask cluster of 2 worker processes (1 thread each), bound to the
loopback interface only, is started and stopped by this module. Oracle:
one single-process capture of the same folder. Skipped without
``dask.distributed`` (``pip install -e ".[distributed]"``).
"""

import operator
import os

import numpy as np
import pytest

pytest.importorskip("distributed", reason='needs dask.distributed: pip install -e ".[distributed]"')

from distributed import Client, LocalCluster  # noqa: E402

from data_tools import capture, distributed  # noqa: E402
from data_tools.distributed import __main__ as distributed_cli  # noqa: E402
from data_tools.merge import __main__ as merge_cli  # noqa: E402
from data_tools.synthetic import random_vit  # noqa: E402
from mrc_ref import formats  # noqa: E402
from mrc_ref.errors import MrcError  # noqa: E402

pytestmark = pytest.mark.slow  # starting worker processes takes seconds

IMAGES = 9
PROXY = 4
#: As in tests/test_merge.py: only the grouping of float64 sums differs;
#: bound ~(rows) u max|C| = 153 x 1.1e-16 ~ 2e-14 of the largest entry.
RTOL = 1e-12
LOOPBACK = {"127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", worker_dashboard_address=None) as c:
        with Client(c) as client:
            yield c, client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from mrc_ref.formats import write_safetensors

    d = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float32) for k, v in random_vit(rng, dim=16, mlp=32, classes=4, grid=4).items()}
    weights = str(d / "w.safetensors")
    write_safetensors(weights, params, {"num_heads": "2"})
    folder = d / "imgs"
    folder.mkdir()
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return weights, str(folder)


def assert_same_capture(got, want):
    (layers, proxy, attrs), (ref_layers, ref_proxy, ref_attrs) = got, want
    assert list(layers) == list(ref_layers)
    for name, st in ref_layers.items():
        assert layers[name]["rows"] == st["rows"]
        for key in ("gram", "sum", "gram_normalized"):
            np.testing.assert_allclose(layers[name][key], st[key], rtol=RTOL, atol=RTOL * np.abs(st[key]).max(),
                                       err_msg=f"{name} {key}")
    np.testing.assert_allclose(proxy, ref_proxy, rtol=2.0**-22, atol=2.0**-22 * np.abs(ref_proxy).max())
    for key in ("weights_sha256", "preprocess", "image_list_sha256", "images_total", "num_images"):
        assert attrs[key] == ref_attrs[key], key


def test_nothing_listens_outside_loopback(cluster):
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    listening = [(p.pid, c.laddr) for p in [me, *me.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in LOOPBACK for _, addr in listening), listening
    assert len(cluster[1].nthreads()) == 2 and all(n == 1 for n in cluster[1].nthreads().values())


def test_tree_reduce_combines_neighbours_in_order(cluster):
    _, client = cluster
    for n in (1, 2, 5, 8):
        parts = client.scatter([str(k) for k in range(n)])
        assert distributed.tree_reduce(client, parts, operator.add).result() == "".join(map(str, range(n)))


@pytest.mark.parametrize("shards", [2, 3])
def test_cluster_capture_equals_single_process_capture(cluster, inputs, shards):
    weights, folder = inputs
    want = capture.capture_part(weights, folder, proxy_images=PROXY, batch_size=4)
    got = distributed.capture_on_cluster(cluster[1], weights, folder, shards=shards, proxy_images=PROXY,
                                         batch_size=2)
    assert_same_capture(got, want)
    assert got[2]["merged_shards"] == shards


def test_command_line_on_the_cluster(cluster, inputs, tmp_path, capsys):
    weights, folder = inputs
    out, ref = tmp_path / "acts.h5", tmp_path / "ref.h5"
    rc = distributed_cli.main([weights, folder, "-o", str(out), "--dask", cluster[0].scheduler_address,
                           "--max-images", "7", "--proxy-images", str(PROXY), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capture.run(weights, folder, str(ref), max_images=7, proxy_images=PROXY, quiet=True)

    def read(path):
        with formats.open_activations(path) as f:
            layers = {name: formats.read_layer_stats(f, name) for name in f["layers"]}
            attrs = {k: getattr(v, "item", lambda v=v: v)() for k, v in f.attrs.items()}
            return layers, formats.read_proxy_tokens(f), attrs

    got = read(out)
    assert_same_capture(got, read(ref))
    assert got[2]["merged_shards"] == 2  # default: one shard per worker thread
    # the cluster's result is a complete capture: the merge accepts it alone
    assert merge_cli.main([str(out), "-o", str(tmp_path / "again.h5"), "--quiet"]) == 0


def test_errors_on_workers_reach_the_client_as_one_line(cluster, inputs, tmp_path, capsys):
    weights, folder = inputs
    bad = tmp_path / "imgs"
    bad.mkdir()
    for name in sorted(os.listdir(folder)):
        (bad / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    (bad / "05.png").write_bytes(b"not a png")
    with pytest.raises(MrcError, match="05.png: cannot read image"):
        distributed.capture_on_cluster(cluster[1], weights, str(bad), shards=3)
    rc = distributed_cli.main([weights, str(bad), "-o", str(tmp_path / "x.h5"), "--dask", cluster[0].scheduler_address,
                           "--shards", "30", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--shards must be between 1 and the number of images (9)" in err
