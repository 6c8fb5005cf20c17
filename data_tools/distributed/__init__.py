"""Capture statistics as shards on a Dask cluster, reduced by a tree of exact adds.

Usage::

    python -m data_tools.distributed WEIGHTS IMAGES -o acts.h5 --dask ADDRESS \\
        [--shards N] [capture options: --max-images M --proxy-images P --batch-size B ...]

Each shard ``K/N`` of the sorted image list (``data_tools.capture``'s
``--shard``) is one Dask task that captures it in memory on a worker; the
parts are added pairwise in a tree of tasks with :func:`data_tools.merge.combine`
(the same function and checks as ``python -m data_tools.merge``) and the
client writes the result. It equals one single-process capture to float64
round-off. The workers must see ``WEIGHTS`` and ``IMAGES`` at the same paths
(a shared file system) and have this package installed (docs/scale.md).

Needs the optional extra: ``pip install -e ".[distributed]"``.
"""


from data_tools import capture, merge
from mrc_ref.errors import MrcError
from mrc_ref.formats import write_activations
from mrc_ref.images import list_images

PROG = "python -m data_tools.distributed"


def capture_shard(weights, images_folder, shard, options):
    """Capture shard ``(K, N)`` in memory (a Dask task): :func:`data_tools.capture.capture_part`
    as a :func:`data_tools.merge.make_part` part, named ``"<weights> (shard K/N on <worker>)"``."""
    layers, proxy, attrs = capture.capture_part(weights, images_folder, shard=shard, **options)
    where = f"{weights} (shard {shard[0]}/{shard[1]} on {_worker_address()})"
    return merge.make_part(layers, proxy, attrs, where)


def _worker_address():
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "the client"


def tree_reduce(client, futures, combine):
    """Reduce ``futures`` pairwise, ``combine(f[0], f[1])``, ``combine(f[2], f[3])``, ...,
    level by level, as Dask tasks; returns the one future left.

    Adjacent parts are combined, so each task adds shards of contiguous
    index ranges; the depth is ``ceil(log2 N)``.
    """
    futures = list(futures)
    while len(futures) > 1:
        level = [client.submit(combine, futures[i], futures[i + 1], pure=False)
                 for i in range(0, len(futures) - 1, 2)]
        if len(futures) % 2:
            level.append(futures[-1])
        futures = level
    return futures[0]


def capture_on_cluster(client, weights, images_folder, *, shards=None, max_images=None,
                       proxy_images=capture.DEFAULT_PROXY_IMAGES, batch_size=capture.DEFAULT_BATCH_SIZE,
                       num_heads=None, device="cpu", dtype="float64"):
    """Capture an image folder on a Dask cluster, in ``shards`` tasks.

    Parameters
    ----------
    client : distributed.Client
    weights, images_folder : str
        Paths valid on every worker.
    shards : int, optional
        Number of shards ``N`` (default: the cluster's total worker threads,
        at most the number of images).
    max_images, proxy_images, batch_size, num_heads, device, dtype
        As for ``python -m data_tools.capture``.

    Returns
    -------
    layers, proxy, attrs
        As :func:`data_tools.merge.finish` returns them (float64).

    Raises
    ------
    MrcError
        Bad input found on the client or on a worker, or parts that do not
        belong together (e.g. a worker that sees a different weights file).
    """
    total = len(list_images(images_folder)[0])
    total = total if max_images is None else min(total, int(max_images))
    if shards is None:
        shards = max(1, min(total, sum(client.nthreads().values())))
    if not 1 <= int(shards) <= total:
        raise MrcError(f"--shards must be between 1 and the number of images ({total}), got {shards}")
    options = {"max_images": max_images, "proxy_images": proxy_images, "batch_size": batch_size,
               "num_heads": num_heads, "device": device, "dtype": dtype}
    parts = [client.submit(capture_shard, weights, images_folder, (k, int(shards)), options, pure=False)
             for k in range(int(shards))]
    return merge.finish(tree_reduce(client, parts, merge.combine).result())


def connect(address):
    """A ``distributed.Client`` of the scheduler at ``address``.

    Raises
    ------
    MrcError
        Dask is not installed, or the scheduler cannot be reached.
    """
    try:
        from distributed import Client
    except ImportError:
        raise MrcError('needs dask.distributed: pip install -e ".[distributed]"') from None
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise MrcError(f"cannot connect to the Dask scheduler at {address!r}: {exc}") from None


def run(weights, images_folder, output, *, address, shards=None, max_images=None,
        proxy_images=capture.DEFAULT_PROXY_IMAGES, batch_size=capture.DEFAULT_BATCH_SIZE, num_heads=None, device="cpu",
        dtype="float64", store_dtype="float64"):
    """The command line's work: refuse a bad output before any work
    (:func:`data_tools.capture.check_capture_output`), capture on the cluster
    at ``address`` (:func:`capture_on_cluster`), write ``output`` atomically.
    Returns the root attributes written."""
    capture.check_capture_output(output, weights, images_folder)
    with connect(address) as client:
        layers, proxy, attrs = capture_on_cluster(client, weights, images_folder, shards=shards,
                                                  max_images=max_images, proxy_images=proxy_images,
                                                  batch_size=batch_size, num_heads=num_heads, device=device,
                                                  dtype=dtype)
    write_activations(output, capture.store(layers, store_dtype), proxy_tokens=proxy, attrs=attrs, inputs=(weights,))
    return attrs
