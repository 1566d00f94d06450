"""Build the text files for distilling and evaluating sentence encoders, from freely licensed text offline.

    python benchmarks/make_text_data.py            # -> .data/text/distill.txt, heldout.txt, SOURCES.md

Sources (Debian packages, read from /usr/share when installed, else fetched with `apt-get download`
and unpacked into .data/text/debs/ without installing anything):

- WordNet 3.0 (`wordnet-base`; the WordNet 3.0 licence, a permissive BSD-style licence by Princeton
  University): every synset's gloss gives one line for its definition and one per quoted example
  sentence ("teach new skills" / "We must retrain the linguists who cannot find employment").
- BSD fortune cookies (`fortunes`, `fortunes-min`; the BSD licence of fortune-mod, Debian main):
  quotations and short texts, one per line, attributions dropped; the ascii-art file is skipped.
- With `--large` only: GCIDE, the GNU Collaborative International Dictionary of English (`dict-gcide`;
  GPL-2+), mostly Webster's 1913: its definitions and quotations up to 160 characters, one per paragraph, into
  `distill_large.txt(.gz)` = distill.txt + those lines. Paragraphs GCIDE took from WordNet are skipped and
  lines equal to a held-out line are dropped, so the held-out files stay unseen; distill.txt, heldout.txt
  and heldout_pairs.tsv are the same bytes with or without `--large`.

General English prose of this kind (definitions, example sentences, quotations) covers the
vocabulary broadly. No sentence-similarity benchmark data is used. Lines are grouped by origin
(a synset's definition and examples, one fortune), the groups shuffled with a fixed seed, and a
held-out set of whole groups is set aside, so no synset or fortune is in both files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".data" / "text"
PACKAGES = ("wordnet-base", "fortunes", "fortunes-min")
LARGE_PACKAGES = ("dict-gcide",)
GCIDE_FILE = "dictd/gcide.dict.dz"  # dictzip: gzip-readable
GCIDE_MAX_CHARS = 160  # GCIDE lines run longer than WordNet's (80 vs 54 chars): keep the shorter 90%, so a
#                        batch (padded to its longest text) costs about what a distill.txt batch does
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
FORTUNE_SKIP = {"ascii-art", "translate-me"}
MIN_WORDS, MAX_CHARS = 3, 400
SEED = 0


def _has(share: Path, large: bool) -> bool:
    return ((share / "wordnet" / "data.noun").is_file() and (share / "games" / "fortunes").is_dir()
            and (not large or (share / GCIDE_FILE).is_file()))


def _find_share(out: Path, large: bool = False) -> Path:
    """A /usr/share-like folder holding wordnet/ and games/fortunes/ (and dictd/gcide.dict.dz with `large`):
    the system's, else unpacked debs."""
    system = Path("/usr/share")
    if _has(system, large):
        return system
    unpacked = out / "debs" / "root" / "usr" / "share"
    if _has(unpacked, large):
        return unpacked
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    packages = PACKAGES + (LARGE_PACKAGES if large else ())
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        sys.exit("need apt-get and dpkg-deb (Debian/Ubuntu), or: apt-get install " + " ".join(packages))
    subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(debs / "root")], check=True)
    return unpacked


def _clean(text: str) -> str:
    """One line: whitespace collapsed, outer quotes and spaces stripped."""
    return " ".join(text.split()).strip().strip('"').strip()


def _ok(line: str) -> bool:
    return len(line.split()) >= MIN_WORDS and len(line) <= MAX_CHARS


def wordnet_groups(share: Path) -> list[list[str]]:
    """Per synset: its definition and its quoted examples (WordNet's `gloss` field)."""
    groups = []
    for name in WORDNET_FILES:
        for raw in (share / "wordnet" / name).read_text(encoding="latin-1").splitlines():
            if raw.startswith("  ") or " | " not in raw:  # the licence header lines start with spaces
                continue
            gloss = raw.split(" | ", 1)[1]
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split(";")[0] if not gloss.lstrip().startswith('"') else ""
            lines = [_clean(t) for t in [definition, *examples]]
            lines = [t for t in lines if _ok(t)]
            if lines:
                groups.append(lines)
    return groups


def noun_synsets(share: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """WordNet's noun synsets: ({offset: definition line as in the text files}, {offset: hypernym offsets})
    (hypernyms: the `@` and `@i` pointers)."""
    definitions, hypernyms = {}, {}
    for raw in (share / "wordnet" / "data.noun").read_text(encoding="latin-1").splitlines():
        if raw.startswith("  ") or " | " not in raw:
            continue
        head, gloss = raw.split(" | ", 1)
        fields = head.split()
        offset, n_words = fields[0], int(fields[3], 16)
        rest = fields[4 + 2 * n_words:]
        n_ptr = int(rest[0])
        ptrs = [rest[1 + 4 * i: 5 + 4 * i] for i in range(n_ptr)]
        hypernyms[offset] = [t for sym, t, pos, _ in ptrs if sym in ("@", "@i") and pos == "n"]
        definition = _clean(gloss.split(";")[0]) if not gloss.lstrip().startswith('"') else ""
        if _ok(definition):
            definitions[offset] = definition
    return definitions, hypernyms


def wup_scorer(hypernyms: dict[str, list[str]]):
    """Wu-Palmer similarity of two noun synsets, 2·depth(lcs) / (depth(a) + depth(b)), with depth = 1 + the
    most hypernym steps to a root (so a proper ancestor is always shallower, and only a synset with itself
    scores 1) and lcs the deepest common ancestor (a synset counts as its own)."""
    depth: dict[str, int] = {}

    def d(x: str) -> int:
        if x not in depth:
            depth[x] = 1 + max((d(h) for h in hypernyms.get(x, [])), default=0)
        return depth[x]

    def ancestors(x: str) -> set[str]:
        seen, todo = {x}, [x]
        while todo:
            for h in hypernyms.get(todo.pop(), []):
                if h not in seen:
                    seen.add(h)
                    todo.append(h)
        return seen

    def score(a: str, b: str) -> float:
        common = ancestors(a) & ancestors(b)
        return 2 * max(d(c) for c in common) / (d(a) + d(b)) if common else 0.0

    return score, ancestors


def heldout_pairs(share: Path, heldout: list[str], n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    """Pairs of held-out noun definitions scored by their synsets' Wu-Palmer similarity: a third random
    pairs, a third sharing a hypernym (siblings), a third sharing an ancestor two steps up, so the scores
    spread over [0, 1]. Only definitions in `heldout` (never in the distillation file) are used."""
    definitions, hypernyms = noun_synsets(share)
    kept = set(heldout)
    synsets = sorted(o for o, t in definitions.items() if t in kept)
    score, ancestors = wup_scorer(hypernyms)
    by_parent: dict[str, list[str]] = {}
    by_grandparent: dict[str, list[str]] = {}
    for o in synsets:
        for h in hypernyms.get(o, []):
            by_parent.setdefault(h, []).append(o)
            for g in hypernyms.get(h, []):
                by_grandparent.setdefault(g, []).append(o)
    pools = [[synsets]] + [[g for g in groups.values() if len(g) > 1] for groups in (by_parent, by_grandparent)]
    pairs, seen = [], set()
    for k, pool in enumerate(pools):
        want = n // 3 + (1 if k < n % 3 else 0)
        tries = 0
        while want and pool[0] and tries < 50 * n:
            tries += 1
            group = rng.choice(pool)
            a, b = rng.sample(group, 2)
            key = tuple(sorted((a, b)))
            if definitions[a] == definitions[b] or key in seen:
                continue
            seen.add(key)
            pairs.append((definitions[a], definitions[b], round(score(a, b), 4)))
            want -= 1
    rng.shuffle(pairs)
    return pairs


def fortune_groups(share: Path) -> list[list[str]]:
    """One line per fortune cookie, its '-- attribution' lines dropped."""
    groups = []
    folder = share / "games" / "fortunes"
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.name in FORTUNE_SKIP or not path.is_file():
            continue
        for cookie in path.read_text(encoding="latin-1").split("\n%\n"):
            kept = [ln for ln in cookie.splitlines() if not ln.strip().startswith("--")]
            line = _clean(" ".join(kept))
            if _ok(line):
                groups.append([line])
    return groups


_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")  # a paragraph's source line: [1913 Webster], [WordNet 1.5], [PJC]


def gcide_lines(share: Path) -> list[str]:
    """GCIDE's definitions and quotations, one line per paragraph: headwords, etymologies, bracketed
    notes, `--Author` attributions and markup dropped; paragraphs sourced from WordNet skipped (the
    held-out text is WordNet's); synonym lists skipped."""
    raw = gzip.open(share / GCIDE_FILE, "rb").read().decode("utf-8", "replace")
    out = []
    for para in raw.split("\n\n"):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any("wordnet" in ln.lower() for ln in lines if _TAG.match(ln)):
            continue
        body = [ln for ln in lines if not _TAG.match(ln)]
        if body and not body[0].startswith(" "):  # a headword line; its etymology may run on over lines
            depth = body[0].count("[") - body[0].count("]")
            body = body[1:]
            while body and depth > 0:
                depth += body[0].count("[") - body[0].count("]")
                body = body[1:]
        text = " ".join(ln.strip() for ln in body)
        if text.startswith(("Syn:", "Usage:")):
            continue
        text = text.split(" --", 1)[0]  # a quotation's attribution
        text = re.sub(r"\[[^\]]*\]", " ", text)  # [Obs.], [R.], etymologies
        text = re.sub(r"^\s*(\d+\.|\([a-z]\))\s*", "", text)  # sense numbers
        text = re.sub(r"^Note:\s*", "", text)
        text = text.replace("{", "").replace("}", "").replace("`", "'")
        if text.count('"') % 2:  # an inline quotation cut by its attribution
            text = text[: text.rfind('"')]
        text = _clean(text)
        if _ok(text) and len(text) <= GCIDE_MAX_CHARS and not re.search(r"[\\*|<>\[\]]| \.", text):
            out.append(text)
    return out


def _write(path: Path, lines: list[str], gz: bool = False) -> str:
    """Write lines (one text each; gzip-compressed with `gz`, reproducibly) through a temporary file
    renamed into place, and return the sha256 of the text."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(gzip.compress(data, compresslevel=9, mtime=0) if gz else data)
    Path(tmp.name).chmod(0o644)
    Path(tmp.name).replace(path)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default .data/text)")
    ap.add_argument("--heldout", type=int, default=3000, help="held-out lines (about)")
    ap.add_argument("--max-distill", type=int, default=200_000, help="at most this many distillation lines")
    ap.add_argument("--gzip", action="store_true", help="also write distill.txt.gz (smaller to carry)")
    ap.add_argument("--pairs", type=int, default=3000, help="scored held-out definition pairs (heldout_pairs.tsv)")
    ap.add_argument("--large", action="store_true",
                    help="also write distill_large.txt(.gz): distill.txt plus GCIDE's definitions and quotations")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    share = _find_share(args.out, args.large)

    sources = {"wordnet": wordnet_groups(share), "fortunes": fortune_groups(share)}
    rng = random.Random(SEED)
    seen: set[str] = set()
    heldout: list[str] = []
    distill: list[str] = []
    total = sum(len(g) for gs in sources.values() for g in gs)
    counts = {}
    for name, groups in sources.items():
        rng.shuffle(groups)
        share_lines = sum(len(g) for g in groups)
        want = round(args.heldout * share_lines / total)  # held-out in proportion to each source
        h0, d0 = len(heldout), len(distill)
        for group in groups:
            fresh = [t for t in group if t.lower() not in seen]
            seen.update(t.lower() for t in fresh)
            (heldout if len(heldout) - h0 < want else distill).extend(fresh)
        counts[name] = {"distill": len(distill) - d0, "heldout": len(heldout) - h0}
    rng.shuffle(distill)
    rng.shuffle(heldout)
    distill = distill[: args.max_distill]

    d_sha = _write(args.out / "distill.txt", distill)
    h_sha = _write(args.out / "heldout.txt", heldout)
    pairs = heldout_pairs(share, heldout, args.pairs, random.Random(SEED))
    p_sha = _write(args.out / "heldout_pairs.tsv", ["sentence1\tsentence2\tscore"] +
                   [f"{a}\t{b}\t{v}" for a, b, v in pairs])
    if args.gzip:
        _write(args.out / "distill.txt.gz", distill, gz=True)
    large_note = ""
    if args.large:
        kept = set(seen)  # every WordNet and fortune line, held out or not (lowercased)
        extra = []
        for t in gcide_lines(share):
            if t.lower() not in kept:
                kept.add(t.lower())
                extra.append(t)
        large = distill + extra
        random.Random(SEED).shuffle(large)
        l_sha = _write(args.out / "distill_large.txt", large)
        if args.gzip:
            _write(args.out / "distill_large.txt.gz", large, gz=True)
        counts["gcide"] = {"distill": len(extra), "heldout": 0}
        large_note = (f"\ndistill_large.txt (`--large`): distill.txt's {len(distill)} lines plus {len(extra)} GCIDE "
                      f"lines (GNU Collaborative International Dictionary of English, Debian package dict-gcide, "
                      f"GPL-2+: definitions and quotations up to {GCIDE_MAX_CHARS} characters, paragraphs sourced from WordNet skipped, lines equal to "
                      f"a WordNet or fortune line dropped), shuffled: {len(large)} lines, sha256 {l_sha}\n")
    (args.out / "SOURCES.md").write_text(
        "# Text data for sentence-encoder distillation\n\n"
        f"Built by `benchmarks/make_text_data.py` from {'the installed packages' if share == Path('/usr/share') else 'the unpacked .deb files'} ({share}).\n\n"
        "| source | Debian package | licence | distill lines | held-out lines |\n|---|---|---|---|---|\n"
        f"| WordNet 3.0 glosses and example sentences | wordnet-base | WordNet 3.0 licence (BSD-style) | "
        f"{counts['wordnet']['distill']} | {counts['wordnet']['heldout']} |\n"
        f"| BSD fortune cookies | fortunes, fortunes-min | BSD (fortune-mod) | "
        f"{counts['fortunes']['distill']} | {counts['fortunes']['heldout']} |\n\n"
        f"distill.txt: {len(distill)} lines, sha256 {d_sha}\n\nheldout.txt: {len(heldout)} lines, sha256 {h_sha}\n\n"
        f"heldout_pairs.tsv: {len(pairs)} pairs of held-out noun definitions (WordNet), each scored by its "
        "synsets' Wu-Palmer similarity (make_text_data.heldout_pairs: a third random pairs, a third sharing a "
        "hypernym, a third an ancestor two steps up), for `sttp-eval --data pairs:FILE`; a sentence-similarity "
        f"stand-in built from the taxonomy, not from human ratings; sha256 {p_sha}\n" + large_note)
    print(f"wrote {args.out}/distill.txt ({len(distill)} lines), heldout.txt ({len(heldout)} lines) and "
          f"heldout_pairs.tsv ({len(pairs)} pairs); sources in SOURCES.md")


if __name__ == "__main__":
    main()
