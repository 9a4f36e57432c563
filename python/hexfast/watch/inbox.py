"""What in a scanner's output folder is a finished slide.

A slide is taken when every file it is made of has kept its size and modification time for `settle`
seconds and OpenSlide opens it. What is ignored, whatever its suffix, because writers use such names
while a file is incomplete:

* hidden names (a leading dot): rsync writes `.NAME.XXXXXX` and renames it at the end; macOS leaves
  `._NAME` resource forks and `.DS_Store`;
* temporary suffixes: `.tmp`, `.temp`, `.part`, `.partial`, `.filepart` (WinSCP), `.crdownload`,
  `.download`, `.!sync`, `.copying`, `.inprogress`, `~`, and `~$NAME` (Office-style lock files);
* anything that is not a slide format OpenSlide reads.

Copy tools that write in place under the final name (robocopy, Explorer, cp, and scanners that write
the image where it will stay — Aperio, Hamamatsu and Philips documentation does not promise
otherwise) are what the settle time is for: a file still growing, or rewritten in place, changes its
size or mtime. robocopy is the exception: it stamps the file it is writing 1980-01-01 and sets the
source's time only when the copy ends (Samba and TrueNAS special-case the pair: truenas/ports#718).
Writes through that handle leave the 1980 stamp alone, so a copy stalled on a network retry (30 s by
default) keeps size and mtime. A file dated 1980-01-01 is therefore still being copied, whatever the
settle time; a robocopy /Z copy that failed for good keeps that date and is never taken.

Multi-file slides are taken whole: MIRAX (`NAME.mrxs` beside a `NAME/` folder whose `Slidedat.ini`
lists its data files: all of them present, all settled) and a DICOM WSI series (a folder of `.dcm`
files: all settled). Both are one slide.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from ..slide import dicom_files
from ..slide.slide import SLIDE_SUFFIXES
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".filepart", ".crdownload", ".download", ".!sync", ".copying",
                 ".inprogress", "~")
# 1980-01-01 in any time zone (robocopy sets it in local time), in ns since the epoch
ROBOCOPY_IN_PROGRESS_NS = (315532800 - 14 * 3600) * 10**9, (315532800 + 24 * 3600 + 12 * 3600) * 10**9
MAX_DEPTH = 4  # scanners write into dated or per-job subfolders; deeper than this is not an inbox


def ignored(name: str) -> bool:
    lower = name.lower()
    return name.startswith((".", "~$")) or lower.endswith(TEMP_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    """A slide in the inbox as it is now: its path (a file, or a DICOM series folder) and a signature
    (sizes and mtimes of every file it is made of) that changes whenever any of them does."""

    path: Path
    signature: tuple
    size: int  # bytes, all its files
    mtime_ns: int  # the newest of its files
    complete: bool  # every file it needs is there (MIRAX: the data files Slidedat.ini lists)
    why: str = ""  # when not complete


def scan(inbox: Path) -> list[Candidate]:
    """Every slide-looking thing under `inbox`, in path order."""
    found: list[Candidate] = []
    _walk(Path(inbox), 0, found)
    return sorted(found, key=lambda c: str(c.path))


def _walk(folder: Path, depth: int, found: list[Candidate]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    mrxs_folders = {e.name[:-5] for e in entries if e.is_file() and e.name.lower().endswith(".mrxs")}
    for entry in entries:
        if ignored(entry.name):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if entry.name in mrxs_folders:
                continue  # a MIRAX slide's data, taken with its .mrxs
            if dicom_files(path):
                found.append(_files_candidate(path, [p for p in sorted(path.iterdir())
                                                     if p.is_file() and not ignored(p.name)]))
            elif depth < MAX_DEPTH:
                _walk(path, depth + 1, found)
        elif entry.is_file() and path.suffix.lower() in SLIDE_SUFFIXES and path.suffix.lower() != ".dcm":
            if path.suffix.lower() == ".mrxs":
                found.append(_mirax(path))
            else:
                found.append(_files_candidate(path, [path]))


def _files_candidate(path: Path, files: list[Path], complete: bool = True, why: str = "") -> Candidate:
    parts, size, newest = [], 0, 0
    for f in files:
        try:
            st = f.stat()
        except OSError:  # went away between listing and stat: not settled
            return Candidate(path, ("gone", str(f)), 0, 0, False, f"{f.name} disappeared")
        parts.append((f.name, st.st_size, st.st_mtime_ns))
        if ROBOCOPY_IN_PROGRESS_NS[0] <= st.st_mtime_ns < ROBOCOPY_IN_PROGRESS_NS[1] and not why:
            complete, why = False, f"{f.name} is dated 1980-01-01: robocopy is still copying it"
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return Candidate(path, tuple(parts), size, newest, complete and bool(files), why or ("" if files else "empty"))


def _mirax(path: Path) -> Candidate:
    folder = path.with_suffix("")
    index = folder / "Slidedat.ini"
    if not index.is_file():
        return _files_candidate(path, [path], False, f"{folder.name}/Slidedat.ini is not there yet")
    files = [path, index]
    try:
        ini = configparser.ConfigParser(interpolation=None, strict=False)
        ini.read(index, encoding="utf-8-sig")
        listed = [ini["DATAFILE"][f"FILE_{i}"] for i in range(int(ini["DATAFILE"]["FILE_COUNT"]))]
    except (KeyError, ValueError, configparser.Error, UnicodeDecodeError):
        return _files_candidate(path, files, False, f"{index.name} does not list its data files yet")
    missing = [name for name in listed if not (folder / name).is_file()]
    files += [folder / name for name in listed if (folder / name).is_file()]
    return _files_candidate(path, files, not missing, f"{len(missing)} of its data files are not there yet"
                            if missing else "")
