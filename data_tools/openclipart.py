"""Write Debian's ``openclipart-png`` clip art as webdataset caption shards with a stratified held-out split.

The package installs ~8,100 PNGs as ``/usr/share/openclipart/png/<category>/[<subcategory>/...]<name>.png``:
RGBA, palette (mostly with a transparent colour), grey + alpha, grey and RGB, from 6 px to 25,000 px a side.
How each becomes a sample:

- **Duplicates.** 2,122 files are byte-identical copies of 903 drawings (symlinks, or one drawing in several
  folders: ``animals/birds/eagle_01.png`` and ``signs_and_symbols/eagle_01.png``). Copies are one sample, so no
  test image is also a training image. Its label is the top category most of its copies are in (ties: the
  category with fewer files, so ``tux`` is an animal rather than one more computer icon); its title and
  subcategories come from the deepest copy there; ``json["copies"]`` lists every path.
- **Label** = index of the top folder in the sorted list of top folders (``classnames``, ``_`` → space).
- **Title.** Most PNGs carry Inkscape ``tEXt`` chunks ``Title`` and ``Author``. The title is used when it is about
  this drawing: it names the start of the file name (names were made from title + author, cut to 24 characters),
  or it is held by this drawing alone and shares a word with the file name. Collection titles that many drawings
  share ("Part of the Flat Icon Collection (...)", "card", "gramastar", "Lemon SVG theme") fail both tests, and so
  does a title that is the author's name. Otherwise the title comes from the file name: the trailing number
  (``_01``, ``_07b``, ``-v0.1``, ``116``) and the author (the ``Author`` chunk or any author of the corpus, in
  file-name form, also cut off where the 24 characters end) are removed, ``_`` and ``-`` become spaces. HTML
  entities and mojibake in the chunks are undone ("L&Atilde;&copy;zard" → "Lézard"). Two big
  generated families get a readable title from their names: ``star_17pt07step`` → "17-pointed star" and
  ``white_h_q`` → "queen of hearts playing card". A name with nothing left gives the deepest folder's name.
- **Caption** = ``"clip art of {title}, {top category}, {subcategories}"`` (repeats dropped), e.g.
  "clip art of armadillo, animals", "clip art of Raccoon Opening Box, animals, mammals".
- **Image.** Transparency is composited onto white (RGBA, LA, palette + transparency); grey images stay grey
  (``L``), the rest is RGB. The longer side is shrunk to at most ``max_size`` (aspect kept, never enlarged).
  Drawings over ``max_pixels`` are skipped before decoding (one of 168 Mpx took 15 s and 1.3 GB to decode).
- **Split.** Per class, the drawings (in path order) are permuted with a seeded RNG; the first
  ``round(n * holdout)`` (at least 1 where the class has 2 or more) are ``test``, the rest ``train``. ``limit``
  keeps a seeded random subset of that split, so a limited test split is part of the full one.

Files that cannot be read or decoded are skipped and counted with one warning line each, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import random
import re
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.captions import MAX_WARNINGS, SkipLog
from data_tools.shards import (
    DEFAULT_SHARD_SIZE,
    DataToolsError,
    Sample,
    check_classnames_compatible,
    finish_split,
    prepare_split_dir,
    write_samples,
)

DEFAULT_SRC = Path("/usr/share/openclipart/png")
NAME = "openclipart"
SPLITS = ("train", "test")
# 256 px: the longer side of half the drawings is under 254 px anyway, a 64-224 px model loses nothing, and the
# whole corpus stays 62 MB of JPEG; pass --max-size 800 for web-like images to benchmark 224-px decoding on.
DEFAULT_MAX_SIZE = 256
DEFAULT_MAX_PIXELS = 40_000_000  # 18 files are larger (up to 623 Mpx); one of 168 Mpx took 15 s and 1.3 GB to decode
DEFAULT_HOLDOUT = 0.1
DEFAULT_QUALITY = 90
FORMATS = {"jpg": "JPEG", "png": "PNG"}
CAPTION_PREFIX = "clip art of"

# Zero-shot prompts, worded like the captions ("clip art of <title>, <category>, ...").
ZERO_SHOT_TEMPLATES = [
    "clip art of {}.",
    "clip art of something, {}.",
    "a clip art drawing from the {} category.",
    "an illustration of {}.",
    "a cartoon drawing of {}.",
]

# Names that stand for an author in file names but are not any Author chunk's file-name form (checked by hand).
AUTHOR_ALIASES = ("ganson", "md", "openclipart")
TRUNCATED_BODY = 24  # file names were made from "title_author" cut to this many characters, then "_NN"

_SLUG_RUN = re.compile(r"[^a-z0-9]+")
# "_01", "_07b", "-v0.1", "_1", "116" (glued: "smiley116"), "01r"; at most one letter after the digits.
_TRAILING_NUMBER = re.compile(r"(?:[_-]*v?\d+(?:\.\d+)*[a-z]?)$", re.IGNORECASE)
_CLIPART_BY = re.compile(r"^clipart by [^-]+ - ", re.IGNORECASE)
_EMAIL = re.compile(r"\s*\([^()]*@[^()]*\)|\S+@\S+")  # "(email: someone@example.org)" or a bare address
_STAR = re.compile(r"^star_(\d+)pt\d+step$")
_CARD = re.compile(r"^(bordered|ornamental|simple|white)_([cdhs])_(\w+)$")
_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
_RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king", "jk": "joker"}
_WORD = re.compile(r"[a-z]{3,}")


@dataclass
class Clip:
    """One distinct drawing (all byte-identical copies together) and what its sample is made from.

    Attributes:
        index: Position in the sorted list of distinct drawings; forms the key ``f"{split}-{index:07d}"``.
        path: The copy the title and subcategories come from.
        categories: Folder names of ``path`` from the top category down, e.g. ``("animals", "birds")``.
        title: Cleaned title (see the module docstring).
        author: The ``Author`` chunk, if any.
        size: Original ``(width, height)``.
        mode: Original PIL mode (``RGBA``, ``P``, ``LA``, ``L``, ``RGB``).
        copies: Every path of the drawing, relative to the source directory.
        label: Index of ``categories[0]`` in the class names.
    """

    index: int
    path: Path
    categories: tuple[str, ...]
    title: str
    author: str | None
    size: tuple[int, int]
    mode: str
    copies: tuple[str, ...]
    label: int = -1


@dataclass
class OpenclipartOptions:
    """How ``write_openclipart`` writes the corpus (defaults as on the command line).

    Attributes:
        max_size: Longest image side after shrinking (never enlarged).
        image_format: ``"jpg"`` (web-like, lossy) or ``"png"`` (lossless).
        quality: JPEG quality.
        holdout: Share of each class in the ``test`` split.
        limit: Keep a seeded random subset of this many drawings (both splits together), for tests.
        max_pixels: Skip drawings with more pixels than this without decoding them.
        shard_size: Maximum samples per shard.
        seed: Seed of the split, the ``limit`` subset and the shuffle.
        overwrite: Replace shards from an earlier run.
    """

    max_size: int = DEFAULT_MAX_SIZE
    image_format: str = "jpg"
    quality: int = DEFAULT_QUALITY
    holdout: float = DEFAULT_HOLDOUT
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    overwrite: bool = False


@dataclass
class OpenclipartResult:
    """What ``write_openclipart`` wrote.

    Attributes:
        entries: ``{split: dataset.json entry}``.
        classnames: Class names by label.
        counts: ``{split: {class name: samples written}}``.
        skipped: ``(path, reason)`` of every file that was not written.
        duplicates: Files dropped as byte-identical copies of another file.
    """

    entries: dict[str, dict[str, Any]]
    classnames: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0


# ---------------------------------------------------------------- titles and captions


def readable(name: str) -> str:
    """Folder or file-name words as text: ``signs_and_symbols`` → ``signs and symbols``."""
    return " ".join(re.split(r"[_\-\s]+", name)).strip()


def slug(text: str) -> str:
    """Lower-case ASCII letters and digits with single ``_`` between runs, as file names spell titles and authors."""
    return _SLUG_RUN.sub("_", text.lower()).strip("_")


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 read as Latin-1 (PIL decodes ``tEXt`` as Latin-1; Inkscape wrote UTF-8), twice where it was done
    twice: ``MoisÃ©s`` → ``Moisés``, ``LÃƒÂ©zard`` → ``Lézard``."""
    for _ in range(2):
        try:
            text = text.encode("latin-1").decode("utf-8")
        except UnicodeError:
            break
    if re.search("[\x80-\x9f]", text):  # C1 controls: Windows-1252 read as Latin-1 ("Mikolá\x9a" → "Mikoláš")
        with contextlib.suppress(UnicodeError):
            text = text.encode("latin-1").decode("cp1252")
    return text


def _strip_author(body: str, truncated: bool, own: str | None, authors: frozenset[str]) -> str:
    """Remove a trailing author from a slugged file-name body (the part before the number)."""
    # Longest suffix after a "_" that is a known author (a set lookup per "_", not a scan of all authors).
    best = next((len(body) - i - 1 for i, c in enumerate(body) if c == "_" and body[i + 1 :] in authors), 0)
    # The file's own author may be cut where the name was cut at 24 characters ("..._architetto_frances"), or
    # spelled by its first words only ("server_zazou" for "zazou (shockwavedj@yahoo.es)").
    if own:
        for k in range(len(own), 0, -1):
            prefix = own[:k].rstrip("_")
            whole_words = k == len(own) or own[k] == "_"
            if (truncated or whole_words) and (body == prefix or body.endswith("_" + prefix)):
                best = max(best, len(prefix))
                break
    return body[: max(len(body) - best - 1, 0)] if best else body


def _strip_clipart_by(body: str, authors: frozenset[str]) -> str:
    """``clipart_by_nicu_buculei_baloon1_04`` → ``baloon1_04`` (a title chunk's boilerplate made into a name)."""
    if not body.startswith("clipart_by_"):
        return body
    rest = body[len("clipart_by_") :]
    best = max((len(a) for a in authors if rest.startswith(a + "_")), default=-1)
    return rest[best + 1 :]


def _strip_number(body: str) -> str:
    """Remove the trailing numbering (twice: ``arrow01_4`` → ``arrow``), keeping something."""
    for _ in range(2):
        shorter = _TRAILING_NUMBER.sub("", body).rstrip("_-")
        if not shorter:
            break
        body = shorter
    return body


def _special_title(stem: str) -> str | None:
    if star := _STAR.match(stem):
        return f"{int(star.group(1))}-pointed star"
    if card := _CARD.match(stem):
        style, suit, rank = card.groups()
        return f"{_RANKS.get(rank, rank)} of {_SUITS[suit]} playing card"  # the style is the folder's name
    return None


def filename_title(stem: str, author: str | None, authors: frozenset[str] = frozenset()) -> str:
    """A title from a file name: the trailing number and the author removed, ``_``/``-`` → spaces.

    Args:
        stem: File name without ``.png``, e.g. ``cigno_architetto_frances_01``.
        author: The file's ``Author`` chunk, if any (matched in file-name form, also where the name was cut off).
        authors: Every author of the corpus in file-name form (``slug``), removed when the name ends in one.

    Returns:
        The title (``"cigno"``), or ``""`` when nothing is left.
    """
    if special := _special_title(stem.lower()):
        return special
    raw = stem.lower()
    number = _TRAILING_NUMBER.sub("", raw)
    truncated = len(number.rstrip("_")) >= TRUNCATED_BODY - 1
    known = authors | set(AUTHOR_ALIASES)
    body = _strip_clipart_by(slug(_strip_number(raw)), known)
    for _ in range(2):  # twice: "mirjam_meijer_mirjam_mei" is author + cut-off author
        body = _strip_author(body, truncated, slug(author) if author else None, known)
    return readable(body)


def _strip_author_words(title: str, author: str | None) -> str:
    """Drop the author's name from the end of a title chunk: "Pinzatrice Rollandin", "... (Rollandin Francesco)"."""
    names = {w for w in slug(author or "").split("_") if len(w) >= 2}
    words = title.split()
    while len(words) > 1 and (parts := slug(words[-1]).split("_")) and all(p in names for p in parts if p):
        words.pop()
    return " ".join(words)


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def chunk_title_fits(title: str, stem: str, unique: bool) -> bool:
    """Whether a ``Title`` chunk names this drawing (see the module docstring)."""
    t, s = slug(title), slug(stem)
    n = min(len(t), len(s))
    if n >= 3 and t[:n] == s[:n] and (len(t) >= len(s) or not s[len(t)].isalpha()):
        return True  # the file name starts with the title (the usual "title_author_NN" naming)
    if not unique:
        return False
    stem_letters, title_letters = re.sub("[^a-z]", "", s), re.sub("[^a-z]", "", t)
    return any(w in stem_letters for w in _words(title)) or any(w in title_letters for w in _words(stem))


def clip_title(
    stem: str, chunk_title: str | None, author: str | None, unique: bool, authors: frozenset[str] = frozenset()
) -> str:
    """The title of one drawing: its ``Title`` chunk where that names it, else one made from the file name.

    Args:
        stem: File name without ``.png``.
        chunk_title: The PNG's ``Title`` chunk (HTML entities and mojibake already undone), if any.
        author: The PNG's ``Author`` chunk, if any.
        unique: The chunk title is held by no other distinct drawing of the corpus.
        authors: Every author of the corpus in file-name form.
    """
    title = _EMAIL.sub("", _CLIPART_BY.sub("", (chunk_title or "").strip())).strip()
    if not title or slug(title) == slug(author or "") or not chunk_title_fits(title, stem, unique):
        return filename_title(stem, author, authors)
    if " " not in title:  # a file name used as the title ("glace_03_bw", "pantyhose12"): clean it the same way
        if title.isascii():
            return filename_title(title, author, authors) or readable(title)
        return readable(_strip_number(title))  # "Lézard": keep the letters a slug would lose
    return _strip_author_words(" ".join(title.replace("_", " ").split()), author)


def caption_for(title: str, categories: tuple[str, ...]) -> str:
    """``"clip art of {title}, {top}, {sub}, ..."``, repeats dropped; no title → the deepest folder's name."""
    words = [readable(c) for c in categories]
    parts = [title or words[-1], *words]
    unique = list(dict.fromkeys(p for p in parts if p))
    return f"{CAPTION_PREFIX} {', '.join(unique)}"


# ---------------------------------------------------------------- scanning


@dataclass
class _File:
    rel: str
    path: Path
    sha: str
    title: str | None
    author: str | None
    size: tuple[int, int]
    mode: str


def _png_files(src: Path) -> list[Path]:
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() != ".png" or not path.is_file():
            continue
        files.append(path)
    return files


def _chunk_text(value: Any) -> str | None:
    # Some chunks hold HTML entities of mojibake ("L&Atilde;&copy;zard"): unescape, then undo the mojibake.
    return (fix_mojibake(html.unescape(value)).strip() or None) if isinstance(value, str) else None


def _read_file(path: Path, rel: str, max_pixels: int) -> _File | str:
    """The file's hash and PNG header, or the reason it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the size is checked below
            with Image.open(io.BytesIO(data)) as image:
                info, size, mode, fmt = image.info, image.size, image.mode, image.format
    except Image.DecompressionBombError:
        return f"too large (over {max_pixels:,} pixels), not decoded"
    # Broad on purpose: PIL raises many unrelated exception types for corrupt data.
    except Exception as exc:
        return f"cannot decode ({type(exc).__name__}: {exc})"
    if fmt != "PNG":
        return f"not a PNG ({fmt})"
    if size[0] * size[1] > max_pixels:
        return f"too large ({size[0]}x{size[1]} > {max_pixels:,} pixels), not decoded"
    title, author = (_chunk_text(info.get(key)) for key in ("Title", "Author"))
    return _File(rel, path, hashlib.sha1(data).hexdigest(), title, author, size, mode)


def _representative(files: list[_File], class_sizes: Counter[str]) -> _File:
    """The copy a drawing's label, title and subcategories come from (see the module docstring)."""
    tops = Counter(f.rel.split("/")[0] for f in files)
    top = min(tops, key=lambda t: (-tops[t], class_sizes[t], t))
    return min((f for f in files if f.rel.split("/")[0] == top), key=lambda f: (-f.rel.count("/"), f.rel))


def scan_openclipart(src: Path, skips: SkipLog, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Clip], list[str]]:
    """List the distinct drawings under ``src`` with their titles, labels and copies.

    Args:
        src: The ``png`` directory (``<category>/[<subcategory>/...]<name>.png``).
        skips: Receives the files that cannot be used (unreadable, not a PNG, too large, outside a category).
        max_pixels: Larger drawings are skipped without decoding.

    Returns:
        ``(clips, classnames)``: clips in path order, each labelled with its top category's index.

    Raises:
        DataToolsError: No usable PNG under ``src``.
    """
    groups: dict[str, list[_File]] = defaultdict(list)
    for path in _png_files(src):
        rel = path.relative_to(src).as_posix()
        if "/" not in rel:
            skips.add(str(path), "not in a category folder")
            continue
        found = _read_file(path, rel, max_pixels)
        if isinstance(found, str):
            skips.add(str(path), found)
        else:
            groups[found.sha].append(found)
    if not groups:
        raise DataToolsError(f"no usable PNG under {src} (expected {src}/<category>/<name>.png)")
    class_sizes = Counter(f.rel.split("/")[0] for files in groups.values() for f in files)
    reps = [(_representative(files, class_sizes), files) for files in groups.values()]
    reps.sort(key=lambda rf: rf[0].rel)
    title_counts = Counter(rep.title for rep, _ in reps)
    authors = frozenset(s for rep, _ in reps if rep.author and len(s := slug(rep.author)) >= 2)
    classnames_raw = sorted({rep.rel.split("/")[0] for rep, _ in reps})
    clips = []
    for index, (rep, files) in enumerate(reps):
        stem = rep.path.name[: -len(rep.path.suffix)]
        title = clip_title(stem, rep.title, rep.author, title_counts[rep.title] == 1, authors)
        categories = tuple(rep.rel.split("/")[:-1])
        copies = tuple(sorted(f.rel for f in files))
        label = classnames_raw.index(categories[0])
        clips.append(Clip(index, rep.path, categories, title, rep.author, rep.size, rep.mode, copies, label))
    return clips, [readable(c) for c in classnames_raw]


# ---------------------------------------------------------------- split


def split_clips(clips: list[Clip], holdout: float, seed: int) -> dict[str, list[Clip]]:
    """Stratified, seeded ``train`` / ``test`` split (see the module docstring); each part in path order."""
    by_label: dict[int, list[Clip]] = defaultdict(list)
    for clip in sorted(clips, key=lambda c: c.index):
        by_label[clip.label].append(clip)
    test_ids: set[int] = set()
    for label, members in by_label.items():
        order = list(range(len(members)))
        random.Random(seed * 1_000_003 + label).shuffle(order)
        n_test = round(len(members) * holdout)
        if holdout > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test_ids |= {members[i].index for i in order[:n_test]}
    ordered = sorted(clips, key=lambda c: c.index)
    return {
        "train": [c for c in ordered if c.index not in test_ids],
        "test": [c for c in ordered if c.index in test_ids],
    }


def limit_clips(split: dict[str, list[Clip]], limit: int | None, seed: int) -> dict[str, list[Clip]]:
    """Keep a seeded random ``limit`` drawings over both splits (``None``: all)."""
    if limit is None:
        return split
    indices = sorted(c.index for part in split.values() for c in part)
    random.Random(seed).shuffle(indices)
    keep = set(indices[:limit])
    return {name: [c for c in part if c.index in keep] for name, part in split.items()}


# ---------------------------------------------------------------- images


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite any transparency onto white: ``RGB``, or ``L`` for grey images (``L``, ``LA``, ``1``, ``I;16``)."""
    grey = image.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L")
    if image.mode.startswith("I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grey → 8-bit, not clipped
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("L" if grey else "RGB")


def shrink(image: Image.Image, max_size: int) -> Image.Image:
    """Shrink so the longer side is at most ``max_size`` (aspect kept, at least 1 px a side; never enlarged)."""
    width, height = image.size
    scale = max_size / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: box-reduce first (fast on the 5,000+ px drawings), then Lanczos over the last factor of 3.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_clip(path: Path, max_size: int, image_format: str, quality: int) -> tuple[bytes, str]:
    """Decode one PNG, shrink it, flatten it onto white and encode it; returns ``(bytes, output mode)``.

    Raises:
        Exception: Whatever PIL raises for a file it cannot decode (the caller skips the file).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            image.load()
            # PIL resamples neither palette nor 1-bit / 16-bit images: convert those first.
            if image.mode in ("P", "PA"):
                work = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
            elif image.mode == "1" or image.mode.startswith("I"):
                work = flatten_on_white(image)
            elif "transparency" in image.info:  # RGB / L with one transparent colour (tRNS)
                work = image.convert("RGBA") if image.mode == "RGB" else image.convert("LA")
            else:
                work = image.copy()
    # Resize before compositing: cheaper, and PIL resamples RGBA / LA with premultiplied alpha (no dark fringes).
    out = flatten_on_white(shrink(work, max_size))
    buffer = io.BytesIO()
    if image_format == "jpg":
        out.save(buffer, format="JPEG", quality=quality)
    else:
        out.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), out.mode


def _samples(
    clips: list[Clip], split: str, opts: OpenclipartOptions, skips: SkipLog, written: Counter[str]
) -> Iterator[Sample]:
    for clip in clips:
        try:
            data, mode = encode_clip(clip.path, opts.max_size, opts.image_format, opts.quality)
        # Broad on purpose: PIL raises many unrelated exception types for corrupt data.
        except Exception as exc:
            skips.add(str(clip.path), f"cannot decode ({type(exc).__name__}: {exc})")
            continue
        class_name = readable(clip.categories[0])
        meta = {
            "label": clip.label,
            "class_name": class_name,
            "category": "/".join(clip.categories),
            "title": clip.title,
            "author": clip.author,
            "original_size": list(clip.size),
            "original_mode": clip.mode,
            "mode": mode,
            "file": "/".join((*clip.categories, clip.path.name)),
            "copies": list(clip.copies),
            "index": clip.index,
            "source": NAME,
            "split": split,
        }
        written[class_name] += 1
        yield Sample(clip.index, data, opts.image_format, caption_for(clip.title, clip.categories), meta)


# ---------------------------------------------------------------- writer


def report_skipped(skipped: list[tuple[str, str]], max_shown: int = MAX_WARNINGS) -> None:
    """One ``warning:`` line per skipped file (at most ``max_shown``) on stderr, then the total."""
    for where, reason in skipped[:max_shown]:
        print(f"warning: skipped {where}: {reason}", file=sys.stderr)
    if len(skipped) > max_shown:
        print(f"warning: ... and {len(skipped) - max_shown} more skipped", file=sys.stderr)
    if skipped:
        print(f"warning: {len(skipped)} files skipped in total", file=sys.stderr)


def _check_options(opts: OpenclipartOptions) -> None:
    if opts.image_format not in FORMATS:
        raise DataToolsError(f"--format must be one of {', '.join(FORMATS)}, got {opts.image_format!r}")
    if opts.max_size < 1:
        raise DataToolsError(f"--max-size must be at least 1, got {opts.max_size}")
    if not 1 <= opts.quality <= 100:
        raise DataToolsError(f"--quality must be in 1..100, got {opts.quality}")
    if not 0 <= opts.holdout < 1:
        raise DataToolsError(f"--holdout must be in [0, 1), got {opts.holdout}")
    if opts.limit is not None and opts.limit < 1:
        raise DataToolsError(f"--limit must be at least 1, got {opts.limit}")


def write_openclipart(
    out: Path, src: Path = DEFAULT_SRC, options: OpenclipartOptions | None = None
) -> OpenclipartResult:
    """Write the openclipart drawings as ``train`` and ``test`` caption shards under ``out``.

    Args:
        out: Dataset directory; gets ``train/``, ``test/``, ``dataset.json``, ``classnames.txt``, ``templates.txt``.
        src: The ``png`` directory (default: where ``openclipart-png`` installs it).
        options: Image size and format, holdout, limit, shard size, seed, overwrite.

    Returns:
        The dataset.json entries, class names, per-class counts per split, skipped files and duplicates dropped.

    Raises:
        DataToolsError: ``src`` is missing or holds no usable PNG, a bad option, or an output directory in the way.
    """
    opts = options or OpenclipartOptions()
    _check_options(opts)
    if not src.is_dir():
        raise DataToolsError(f"{src} not found; install it with: apt-get install -y openclipart-png")
    skips = SkipLog()
    clips, classnames = scan_openclipart(src, skips, opts.max_pixels)
    check_classnames_compatible(out, classnames)
    splits = limit_clips(split_clips(clips, opts.holdout, opts.seed), opts.limit, opts.seed)
    splits = {name: part for name, part in splits.items() if part}  # no test split with --holdout 0
    split_dirs = {name: prepare_split_dir(out, name, opts.overwrite) for name in splits}
    entries, counts = {}, {}
    for name, part in splits.items():
        # Shuffled (test too): shards mix classes, and an eval capped at max_samples still sees every class.
        random.Random(f"{opts.seed}-{name}").shuffle(part)
        written: Counter[str] = Counter()
        samples = _samples(part, name, opts, skips, written)
        sizes = write_samples(split_dirs[name], name, samples, len(part), opts.shard_size)
        if not sizes:
            report_skipped(skips.entries)
            raise DataToolsError(f"no decodable drawings for split {name!r} ({len(skips.entries)} skipped)")
        entries[name] = finish_split(out, name, sizes, NAME, classnames, ZERO_SHOT_TEMPLATES)
        counts[name] = {c: written[c] for c in classnames}
    report_skipped(skips.entries)
    duplicates = sum(len(c.copies) - 1 for c in clips)
    return OpenclipartResult(entries, classnames, counts, skips.entries, duplicates)
