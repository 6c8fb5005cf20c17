"""``python -m data_tools.train_example [--out DIR] [--epochs N]``

Train the small embedded example ViT on scikit-learn's handwritten digits
and write it, with its images, into mrc_ref/example/ (run once, from the
repository root, after ``pip install scikit-learn "torch==2.13.0"``).

Writes ``mrc_ref/example/images/{calib,test}/<class>/NNNN.png`` (NNNN is
the index in ``sklearn.datasets.load_digits``), ``model.safetensors``
(timm ``VisionTransformer`` state-dict layout, float32), ``test_logits.npy``
(the torch model's test-set logits, in ``list_images`` order) and
``README.md``; also copies the logits to ``/tmp/example_test_logits.npy``.

scikit-learn and torch are needed by this script only; the package never
imports it.
"""

import math
import os
import shutil
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a file: make ``data_tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrc_ref import cli  # noqa: E402
from mrc_ref.example import EXAMPLE_DIR  # noqa: E402
from mrc_ref.formats import write_safetensors  # noqa: E402
from mrc_ref.images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, iter_batches, list_images  # noqa: E402

SEED = 0
N_TEST = 497
N_CALIB = 300
IMG_SIZE = 16
CROP_PCT = 0.875
PATCH = 4
DIM = 64
DEPTH = 4
HEADS = 4
MLP_RATIO = 4
NUM_CLASSES = 10
EPOCHS = 120
BATCH = 50
LR = 2e-3
WEIGHT_DECAY = 0.05
LOGITS_TMP = "/tmp/example_test_logits.npy"


# ----------------------------------------------------------------- data
def digits_to_uint8(images):
    """(N, 8, 8) values 0..16 -> (N, 8, 8) uint8 with ``round(v * 255 / 16)``."""
    return np.rint(np.asarray(images, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)


def split_indices(labels, seed=SEED):
    """Stratified train / calib / test index arrays (sorted), seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=N_TEST, stratify=labels, random_state=seed)
    train, calib = train_test_split(rest, test_size=N_CALIB, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(calib), np.sort(test)


def write_pngs(root, pixels, labels, indices):
    """Write ``root/<class>/NNNN.png`` (8-bit greyscale) for ``indices``."""
    from PIL import Image

    if os.path.isdir(root):
        shutil.rmtree(root)
    for c in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, str(c)))
    for i in indices:
        Image.fromarray(pixels[i], mode="L").save(os.path.join(root, str(int(labels[i])), f"{int(i):04d}.png"), optimize=True)


def transform_all(pixels):
    """The evaluation transform of each uint8 8x8 image -> (N, 3, 16, 16) float32."""
    from PIL import Image

    return np.stack([eval_transform(Image.fromarray(p, mode="L"), size=IMG_SIZE, crop_pct=CROP_PCT) for p in pixels])


# ----------------------------------------------------------------- model (timm layout)
def build_model():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.head_dim = dim // num_heads
            self.scale = self.head_dim**-0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()  # exact (erf) GELU
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, mlp_ratio):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, num_heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, dim * mlp_ratio)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            n_patches = (IMG_SIZE // PATCH) ** 2
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
            self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, DIM))
            self.blocks = nn.Sequential(*[Block(DIM, HEADS, MLP_RATIO) for _ in range(DEPTH)])
            self.norm = nn.LayerNorm(DIM, eps=1e-6)
            self.head = nn.Linear(DIM, NUM_CLASSES)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            x = self.norm(self.blocks(x))
            return self.head(x[:, 0])

    return VisionTransformer()


def shift_augment(x, gen, fill):
    """Random shifts of -1..+1 pixel (each axis) of (B, 3, H, W), filled with ``fill`` (3,)."""
    import torch

    B, C, H, W = x.shape
    padded = fill.view(1, C, 1, 1).expand(B, C, H + 2, W + 2).clone()
    padded[:, :, 1:-1, 1:-1] = x
    dy = torch.randint(0, 3, (B,), generator=gen)
    dx = torch.randint(0, 3, (B,), generator=gen)
    out = torch.empty_like(x)
    for b in range(B):
        out[b] = padded[b, :, dy[b] : dy[b] + H, dx[b] : dx[b] + W]
    return out


def train(model, x_train, y_train, epochs=EPOCHS, log=print):
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(SEED)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    fill = torch.from_numpy(((0.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)).astype(np.float32))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    total = epochs * steps_per_epoch
    warmup = 5 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for s in range(0, len(x), BATCH):
            batch = order[s : s + BATCH]
            xb = shift_augment(x[batch], gen, fill)
            out = model(xb)
            loss = loss_fn(out, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(batch)
            loss_sum += loss.item() * len(batch)
            correct += int((out.argmax(1) == y[batch]).sum())
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1:3d}/{epochs}  loss {loss_sum / seen:.4f}  train acc {correct / seen:.4f}")


def torch_logits(model, folder):
    """Logits and labels of ``folder`` read through ``mrc_ref.images`` (list_images order)."""
    import torch

    model.eval()
    logits, labels, paths = [], [], []
    with torch.no_grad():
        for xb, yb, pb in iter_batches(folder, 128, size=IMG_SIZE, crop_pct=CROP_PCT):
            logits.append(model(torch.from_numpy(xb)).numpy())
            labels.append(yb)
            paths.extend(pb)
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels), paths


# ----------------------------------------------------------------- readme
README = """# Embedded example: a small ViT on handwritten digits

A tiny timm-layout Vision Transformer trained on real images, shipped so that
the whole `mrc_ref` pipeline (calibration statistics, compression,
evaluation) can run end to end offline and quickly.

Generated by `data_tools/train_example.py`; do not edit by hand. To
regenerate (from the repository root; scikit-learn and torch are needed by
this script only):

    pip install scikit-learn "torch=={torch_version}"
    python -m data_tools.train_example

## Data

scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, shipped
inside the scikit-learn wheel): 1797 greyscale 8x8 images, 10 classes. It is
a copy of the test set of the UCI ML "Optical Recognition of Handwritten
Digits" dataset (E. Alpaydin and C. Kaynak, 1998,
https://archive.ics.uci.edu/dataset/80). Licences: scikit-learn is
BSD-3-Clause; the UCI dataset is CC BY 4.0 (attribution: Alpaydin, E. &
Kaynak, C. (1998). Optical Recognition of Handwritten Digits. UCI Machine
Learning Repository. https://doi.org/10.24432/C50P49). The PNG files here
are a derived copy of that data under the same CC BY 4.0 terms.

Each value v in 0..16 is written as an 8-bit greyscale pixel
`round(v * 255 / 16)`. Stratified split (`sklearn.model_selection.train_test_split`,
`random_state={seed}`, scikit-learn {sklearn_version}):

| split | images | shipped as |
| --- | --- | --- |
| train | {n_train} | not shipped (used by the script only) |
| calibration ("proxy") | {n_calib} | `images/calib/<class>/NNNN.png` |
| test | {n_test} | `images/test/<class>/NNNN.png` |

`NNNN` is the image's index in `load_digits()`; class folders are `0`..`9`.

## Model

`model.safetensors` (float32, metadata `num_heads="4"`,
`source="data_tools/train_example.py"`) holds a timm `VisionTransformer`
state dict: img_size 16, patch 4 (16 patches + class token = 17 tokens),
embed dim 64, depth 4, 4 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6,
exact GELU, learned `pos_embed` (1, 17, 64), final norm, head 10 classes.
{n_params} parameters.

Inputs are the DeiT evaluation transform of `mrc_ref.images`
(`eval_transform(img, size=16, crop_pct=0.875)`: RGB, bicubic resize of the
shorter side to 18, centre crop 16, ImageNet mean/std), both in training and
in evaluation. Training: AdamW (lr {lr}, weight decay {wd}, 5 warm-up epochs then
cosine), {epochs} epochs of batch {batch}, label smoothing 0.1, random
shifts of up to one pixel; `torch.manual_seed({seed})`, deterministic
algorithms, 2 threads, torch {torch_version}.

**Test accuracy (torch, {n_test} images): {acc:.2f} %** ({n_correct}/{n_test}).
Calibration-set accuracy: {calib_acc:.2f} %.

`test_logits.npy` (float32, ({n_test}, 10)) holds the torch model's logits on
the test images in the order `mrc_ref.images.list_images("images/test")`
returns, as a reference for an independent forward pass.
"""


def build_parser():
    parser = cli.parser("python -m data_tools.train_example", __doc__)
    parser.add_argument("--out", default=EXAMPLE_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=cli.positive_int, default=EPOCHS, help="training epochs (default: %(default)s)")
    return parser


def main(argv=None):
    return cli.run(build_parser(), _train, argv)


def _train(args):

    import sklearn
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    t0 = time.time()

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    pixels = digits_to_uint8(digits.images)
    train_idx, calib_idx, test_idx = split_indices(labels)
    print(f"split: train {len(train_idx)}, calib {len(calib_idx)}, test {len(test_idx)}")

    os.makedirs(args.out, exist_ok=True)
    image_dir = os.path.join(args.out, "images")
    os.makedirs(image_dir, exist_ok=True)
    calib_dir = os.path.join(image_dir, "calib")
    test_dir = os.path.join(image_dir, "test")
    write_pngs(calib_dir, pixels, labels, calib_idx)
    write_pngs(test_dir, pixels, labels, test_idx)

    x_train = transform_all(pixels[train_idx])
    y_train = labels[train_idx]
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    train(model, x_train, y_train, epochs=args.epochs)

    logits, y_test, test_paths = torch_logits(model, test_dir)
    n_correct = int((logits.argmax(1) == y_test).sum())
    acc = 100.0 * n_correct / len(y_test)
    calib_logits, y_calib, _ = torch_logits(model, calib_dir)
    calib_acc = 100.0 * float((calib_logits.argmax(1) == y_calib).mean())
    print(f"test accuracy (torch): {acc:.2f} % ({n_correct}/{len(y_test)}); calib accuracy {calib_acc:.2f} %")

    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    write_safetensors(
        os.path.join(args.out, "model.safetensors"),
        state,
        metadata={"num_heads": str(HEADS), "source": "data_tools/train_example.py"},
    )
    np.save(os.path.join(args.out, "test_logits.npy"), logits)
    np.save(LOGITS_TMP, logits)
    with open(os.path.join(args.out, "README.md"), "w") as fh:
        fh.write(
            README.format(
                torch_version=torch.__version__.split("+")[0],
                sklearn_version=sklearn.__version__,
                seed=SEED,
                n_train=len(train_idx),
                n_calib=len(calib_idx),
                n_test=len(test_idx),
                n_params=f"{n_params:,}",
                lr=LR,
                wd=WEIGHT_DECAY,
                epochs=args.epochs,
                batch=BATCH,
                acc=acc,
                n_correct=n_correct,
                calib_acc=calib_acc,
            )
        )
    assert [os.path.relpath(p, test_dir) for p in test_paths] == [
        os.path.relpath(p, test_dir) for p in list_images(test_dir)[0]
    ]
    print(f"wrote {args.out} and {LOGITS_TMP} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
