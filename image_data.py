"""Image data sets the scripts read: --data cifar10 | a folder of images | an .npz of uint8
images [N, H, W, C] (+ labels), always as uint8 tensors [N, C, H, W] (common.from_uint8 makes
them [-1, 1] floats on the device), with a content fingerprint that a resumed run checks.
"""
import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import Interrupted, fail


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageData:
    """uint8 images [N, C, H, W], int64 labels (or None) and, for paired data, uint8 sources
    like the images (or None), in memory or read lazily from a folder."""

    def __init__(self, images=None, labels=None, folder=None, sources=None):
        self.images, self.labels, self.folder, self.sources = images, labels, folder, sources

    def __len__(self):
        return len(self.folder) if self.folder is not None else len(self.images)

    @property
    def shape(self):
        return tuple(self.folder.shape if self.folder is not None else self.images.shape[1:])

    @property
    def has_labels(self):
        return (self.folder.labels if self.folder is not None else self.labels) is not None

    @property
    def has_sources(self):
        return self.sources is not None

    @property
    def num_classes(self):
        labels = self.folder.labels if self.folder is not None else self.labels
        return None if labels is None else int(labels.max()) + 1

    def fingerprint(self):
        """sha256 (16 hex digits) of the content: every image, label and source of in-memory
        data (an .npz, CIFAR-10; about a second for 50k images); for a folder, the files'
        relative names and sizes (reading every image would cost a pass over the data)."""
        h = hashlib.sha256()
        if self.folder is not None:
            for f in self.folder.files:
                h.update(f"{os.path.relpath(f, self.folder.root)}:{os.path.getsize(f)};".encode())
        else:
            for a in (self.images, self.labels, self.sources):
                h.update(b"-" if a is None else a.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def get(self, index):
        """(images, labels or None, sources or None) at the given indices."""
        if self.folder is not None:
            items = [self.folder[i] for i in index]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items]) if self.has_labels else None
            return x, y, None
        index = torch.as_tensor(index)
        return (self.images[index], None if self.labels is None else self.labels[index],
                None if self.sources is None else self.sources[index])


class FolderImages(torch.utils.data.Dataset):
    """Image files below `root`, center-cropped and resized to `size`; class = sub-folder name.
    Every file is read once when the folder is opened (check_images): one unreadable image
    would otherwise end the run with the data loader's traceback when a batch first draws it,
    hours in."""

    def __init__(self, root, size):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        check_images(files, root, size)
        classes = sorted({os.path.relpath(os.path.dirname(f), root) for f in files})
        self.files, self.size, self.root = files, size, root
        self.labels = None
        if classes != ["."]:
            index = {c: i for i, c in enumerate(classes)}
            self.labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), root)]
                                        for f in files])
        self.shape = (3, size, size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if s != self.size:
                im = im.resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        return x, (-1 if self.labels is None else int(self.labels[i]))


def unreadable_image(path, size=None):
    """Why PIL cannot read `path` as an RGB image (None if it can): its structure and
    checksums (verify: every PNG chunk's CRC, without decoding), then a decode, as
    FolderImages.__getitem__ does it (a truncated JPEG passes verify and fails here); a JPEG
    is decoded at about `size` (draft: DCT scaling, a few times cheaper, the same data read)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again
            if size:
                im.draft("RGB", (size, size))
            im.convert("RGB").load()
    except Interrupted:
        raise
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]
    return None


def check_images(files, root, size=None):
    """Refuse, in one line, a folder with images that cannot be read, naming the first and how
    many. Decoding runs in threads (PIL releases the GIL); for the folder sizes of image data
    sets (CIFAR-10's 50,000 32x32 PNGs) it costs seconds, once per run."""
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    try:
        reasons = list(pool.map(lambda f: unreadable_image(f, size), files))
    finally:  # on a Ctrl-C, the files not yet started are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    bad = [(f, why) for f, why in zip(files, reasons) if why]
    if bad:
        first, why = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(files)})" if len(bad) > 1 else ""
        fail(f"image folder {root}: cannot read {os.path.relpath(first, root)}{more} ({why}); "
             "remove or replace the unreadable files")


def read_npz_images(path):
    """uint8 images [N, H, W, C] from an .npz (key `images`, `arr_0` or its only array), its
    `labels` (or None) and, for a pairs file, its `source` images (or None)."""
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not an .npz archive (np.savez / np.savez_compressed); pass an .npz of "
             "uint8 images [N, H, W, C] under the key `images`")
    try:
        with np.load(path) as f:
            keys = list(f.keys())
            key = next((k for k in ("images", "arr_0") if k in keys), keys[0] if len(keys) == 1
                       else None)
            if key is None:
                fail(f"{path} has no `images` array (keys: {', '.join(keys)}); save the uint8 "
                     "images [N, H, W, C] under the key `images`")
            images = f[key]
            labels = f["labels"] if "labels" in keys else None
            sources = f["source"] if "source" in keys else None
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} as .npz ({e}); pass an .npz of uint8 images [N, H, W, C]")
    for name, a in (("images", images), ("source", sources)):
        if a is not None and (a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3)):
            fail(f"{path}: expected uint8 {name} [N, H, W, C] with C in (1, 3), got "
                 f"{a.dtype} {list(a.shape)}")
    if sources is not None and sources.shape != images.shape:
        fail(f"pairs file {path}: `source` {list(sources.shape)} and `images` "
             f"{list(images.shape)} differ in shape; save each source at its target's size")
    return images, labels, sources


def open_data(data, root, image_size):
    """The --data source as ImageData; image_size is used to resize folders, checked otherwise."""
    sources = None
    if data == "cifar10":
        from torchvision.datasets import CIFAR10
        try:
            ds = CIFAR10(root, train=True, download=True)
        except Interrupted:  # a SIGTERM during the download or extraction is a stop
            raise
        except Exception as e:  # no network, a broken archive, ...
            fail(f"cannot load CIFAR-10 into {root} ({e}); check the network or --data-root")
        images, labels = np.asarray(ds.data), np.asarray(ds.targets)
    elif os.path.isdir(data):
        return ImageData(folder=FolderImages(data, image_size))
    elif data.endswith(".npz"):
        if not os.path.isfile(data):
            fail(f"--data {data} does not exist; pass cifar10, an image folder or an .npz file")
        images, labels, sources = read_npz_images(data)
    else:
        fail(f"--data {data} is neither cifar10, an existing folder nor an .npz file")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if sources is not None:
        sources = torch.from_numpy(sources).permute(0, 3, 1, 2).contiguous()
    if labels is not None:
        labels = torch.from_numpy(np.asarray(labels)).long().reshape(-1)
        if len(labels) != len(images):
            fail(f"--data has {len(images)} images but {len(labels)} labels")
    return ImageData(images, labels, sources=sources)


def check_data(data, net_config, cond, what="the network"):
    """Data must have the network's channels and size, and labels if the model is conditional."""
    c, h, w = data.shape
    want = (net_config["in_channels"], net_config["image_size"], net_config["image_size"])
    if (c, h, w) != want:
        fail(f"data images are {c}x{h}x{w} but {what} expects {want[0]}x{want[1]}x{want[2]}; "
             "resize the data or set --image-size / use a matching checkpoint")
    if cond and not data.has_labels:
        fail("a class-conditional model needs labels: add a `labels` array to the .npz or use "
             "one sub-folder per class (or train an unconditional model without --cond)")
    if cond and data.num_classes > net_config["num_classes"]:
        fail(f"data has {data.num_classes} classes but the model has {net_config['num_classes']}")
