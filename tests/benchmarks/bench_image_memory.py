#!/usr/bin/env python
"""Peak memory of one image's transform, against the transform before the memory bound
(a script, not a pytest module).

Each case writes one synthetic image (blank, so the files are small but
decode to full size), then in a fresh interpreter per measurement reads it
with

* ``old``: the route before the change: convert to RGB at full size (16-bit
  greyscale through a float64 copy), then resize, crop, normalise, with no
  memory bound;
* ``new``: :func:`mrc_ref.images.load_image` (greyscale resized before it is
  converted, 16-bit scaled a band of rows at a time, images over
  :data:`mrc_ref.images.MAX_IMAGE_BYTES` refused from their header).

The figure is the growth of the process's peak resident size (``VmHWM``
after minus before, in MB) while one image is read, the interpreter and
its imports already loaded; with the estimate
:func:`mrc_ref.images.transform_bytes` (MB) and ``refused`` when ``new``
refuses the image. Target: every image ``new`` accepts stays under
``MAX_IMAGE_BYTES`` (about 0.2 GB, docs/cli.md) and under its estimate.
One JSON line per case, then the machine load and BLAS threads.

Usage: ``python tests/benchmarks/bench_image_memory.py [--quick]`` (quick:
three cases). Linux only (``/proc/self/status``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import math, sys
import numpy as np
from PIL import Image
from mrc_ref import images

def hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

def old(path, size, crop_pct=images.DEFAULT_CROP_PCT):
    with Image.open(path) as img:
        img.load()
        if img.mode in images._SIXTEEN_BIT_MODES:
            wide = np.asarray(img).astype(np.float64)
            img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
        img = img.convert("RGB") if img.mode != "RGB" else img
        img = images.resize_shorter(img, int(math.floor(size / crop_pct)))
        img = img.crop(images._center_crop_box(img.size[0], img.size[1], size))
        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        return x.transpose(2, 0, 1)

route, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = hwm()
try:
    (old if route == "old" else images.load_image)(path, size=size)
    refused = False
except images.MrcError:
    refused = True
print(hwm() - before, refused)
"""

CASES = [  # mode, width, height, model input size
    ("L", 1_000_000, 64, 16),
    ("L", 8000, 8000, 224),
    ("I;16", 8000, 8000, 16),
    ("RGB", 8000, 6250, 224),
    ("RGB", 8000, 8000, 224),
    ("RGBA", 8000, 8000, 16),
    ("P", 8000, 8000, 16),
]


def write(path, mode, width, height):
    from PIL import Image

    Image.new(mode, (width, height)).save(path)


def measure(route, path, size):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, route, path, str(size)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode:
        return None, done.stderr.strip().splitlines()[-1:]
    mb, refused = done.stdout.split()
    return float(mb), refused == "True"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three cases")
    args = parser.parse_args()
    from mrc_ref.images import MAX_IMAGE_BYTES, transform_bytes

    cases = CASES[:1] + CASES[2:4] if args.quick else CASES
    with tempfile.TemporaryDirectory() as root:
        for mode, width, height, size in cases:
            path = os.path.join(root, f"{mode.replace(';', '')}_{width}x{height}.png")
            write(path, mode, width, height)
            old_mb, _ = measure("old", path, size)
            new_mb, refused = measure("new", path, size)
            estimate = transform_bytes(mode, width, height, size) / 1e6
            print(json.dumps({"figure": "image_transform_peak_mb", "mode": mode, "width": width, "height": height,
                              "size": size, "old_mb": old_mb, "new_mb": new_mb, "refused": refused,
                              "estimate_mb": round(estimate, 1), "limit_mb": MAX_IMAGE_BYTES / 1e6,
                              "new_over_old": None if not old_mb or refused else round(new_mb / old_mb, 3),
                              "within_limit": refused or new_mb <= MAX_IMAGE_BYTES / 1e6}))
    try:
        from threadpoolctl import threadpool_info
        threads = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    except ImportError:
        threads = os.environ.get("OPENBLAS_NUM_THREADS")
    print(json.dumps({"load": os.getloadavg(), "blas_threads": threads}))


if __name__ == "__main__":
    main()
