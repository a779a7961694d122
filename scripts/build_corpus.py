#!/usr/bin/env python3
"""Assemble the test corpus of real messages from its public sources.

The tests read a folder of real mail written by other people (see the table in
``MANIFEST`` below): CPython's ``test_email`` data, the ``mail-parser`` sdist's
test mails, SpamAssassin's sample messages and ClamAV's test files. Beside the
project's CI checkout that folder already exists; on any other machine this
script builds the same files into a cache folder, so nothing is copied into
the repository.

Usage::

    python scripts/build_corpus.py DEST

Prints DEST on success. Exits 1 with one line naming the source that could not
be reached (a missing Debian package, a PyPI download that failed, ...).
A file whose bytes differ from the recorded SHA-256 (another release of a
source package) is used anyway and named in a ``note:`` line on stderr.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

MAIL_PARSER = "mail-parser==4.8.0"
SPAMASSASSIN_EXAMPLES = Path("/usr/share/doc/spamassassin/examples")
CLAMAV_TESTFILES = Path("/usr/share/clamav-testfiles")

# destination -> (source kind, source file name, SHA-256 of the recorded copy)
MANIFEST: dict[str, tuple[str, str, str]] = {
    "clamav/clam.exe.bin": ("clamav", "clam.exe", "71e7b604d18aefd839e51a39c88df8383bb4c071dc31f87f00a2b5df580d4495"),
    "clamav/clam.exe.mbox.base64.eml": ("clamav", "clam.exe.mbox.base64", "0878e94280d2f5f02268c733f91bc3293f8a89b4ae65ed8dc606bb489e09a388"),
    "clamav/clam.zip": ("clamav", "clam.zip", "d7c5ab686ee8bba09555d19bb854cfbcbe06d4bcbf87e3e3285878e8d47b80de"),
    "spamassassin/sample-nonspam.eml": ("spamassassin", "sample-nonspam.txt", "ea6d871ca7ae375f20bebc2a136e88f4006f8044e50fc92aae6deeac02fde7af"),
    "spamassassin/sample-spam.eml": ("spamassassin", "sample-spam.txt", "f9a5440d1dd99f60e876c4231c775501630d4096d8eb9e374dd0513c3f8d1ae8"),
    "mail-parser/mail_malformed_2.eml": ("mail-parser", "mail_malformed_2", "f2fcdf6366ade5d846e6e209c6a137d8f976ff0715a6190bfc2847f2b0309879"),
    "mail-parser/mail_test_1.eml": ("mail-parser", "mail_test_1", "b7883d1cfdaff2b05ad54842f4bdfc59ef5d76aa6387bd2dbdaeceddc6d97d6a"),
    "mail-parser/mail_test_12.eml": ("mail-parser", "mail_test_12", "df75861851d704eb3aeb8db9b64cb8db5b963e53a44e7c7da794bf29e9f34d69"),
    "mail-parser/mail_test_13.eml": ("mail-parser", "mail_test_13", "d6ea8da145b0361d9454113a3800f14972d0ebfe8d1c3f280fbf882951bc73d4"),
    "mail-parser/mail_test_14.eml": ("mail-parser", "mail_test_14", "9e48472c464b368562b8fcc238d612733398876c2c2673f84014dc08be36ee4e"),
    "mail-parser/mail_test_16.eml": ("mail-parser", "mail_test_16", "534720c59f139a0c128e15d49dd0b453c1e6a1ca578fc18901b360aad0f0581c"),
    "mail-parser/mail_test_3.eml": ("mail-parser", "mail_test_3", "07945c6dcdee743cc843f5b8fd41e338e62c1781a52e2fd36cf019a29eb5a2a6"),
    "mail-parser/mail_test_5.eml": ("mail-parser", "mail_test_5", "c8ec7ffb66dd8906cfca64d0deca9c26983e6ca1a6000a8001def4a30984759e"),
    "mail-parser/mail_test_7.eml": ("mail-parser", "mail_test_7", "04feb2ba606e85931c8e82bcd03f7305add1858b614769f8480ad8b75d55f9f8"),
    "mail-parser/mail_test_9.eml": ("mail-parser", "mail_test_9", "e0984326c6260ba2347042add2f670382cb449f63d081d6edadee7dca8b35e57"),
    "cpython/msg_01.eml": ("cpython", "msg_01.txt", "c15a3a17f6b65e9c51c58ed3a79d12bc517f867321ed118e5dc7b5c3a1ed7d4b"),
    "cpython/msg_02.eml": ("cpython", "msg_02.txt", "05d5e533f5e590d9ee2c7692d26dc87ccbf381f4831cca3362baf596691a55bb"),
    "cpython/msg_03.eml": ("cpython", "msg_03.txt", "e34151ed8e0c5f0ea996f1128834b15f41f5e2081a41dca2ba7f2f307c331f49"),
    "cpython/msg_04.eml": ("cpython", "msg_04.txt", "a8a24bcd720323185063761b53731cd6dcc5583fc0fd7ffd972137f345b1d738"),
    "cpython/msg_05.eml": ("cpython", "msg_05.txt", "845bca9a59de1959c1501cbc1f2c90fa9ab73a38653175fe94073c012fa555b1"),
    "cpython/msg_06.eml": ("cpython", "msg_06.txt", "0c4e8456a424135a4dda4829050de77b05c7fb56ef716841bdfe1371af2eb695"),
    "cpython/msg_07.eml": ("cpython", "msg_07.txt", "8358092b45c8631df6466a2e4dc23278263b2dd2ba5765e99caba47c304dd3b5"),
    "cpython/msg_08.eml": ("cpython", "msg_08.txt", "357bf940a54f04d5f7b335a0a6697a1e9dda14eb2f1dbc590beb0fe98ed65f02"),
    "cpython/msg_09.eml": ("cpython", "msg_09.txt", "3ee9d9ab704a1f7e0ce35bb832fe7189528cb5873d1f30285d3520bc48f66eb8"),
    "cpython/msg_10.eml": ("cpython", "msg_10.txt", "31b6aa0a2168c412559b6c9667846d84de86554af573a1a9dfa5dc753de3754a"),
    "cpython/msg_11.eml": ("cpython", "msg_11.txt", "7ac917c8e4309742c3571b8c3c8d97361ab6b838f7cd5bda498a410d9d6d9fc7"),
    "cpython/msg_12.eml": ("cpython", "msg_12.txt", "449711060a7ec45e0a4bfbd5d497d069676cbf31f77f3385d3e166795e79deaa"),
    "cpython/msg_12a.eml": ("cpython", "msg_12a.txt", "defa4275a55f7778d400fcbf0628822dcae95d8239da065ba8e40049daaa32e4"),
    "cpython/msg_13.eml": ("cpython", "msg_13.txt", "6538070d2455c077280a8b537f23e3e3a7362074ba2630567d7f951f11fa113d"),
    "cpython/msg_14.eml": ("cpython", "msg_14.txt", "81a2f5fdaf0a506502fd4cac0ccc0c5e7ccc02330150b75d3d7fd4bde0e3c95e"),
    "cpython/msg_15.eml": ("cpython", "msg_15.txt", "8f1c4f13d767b8a4d55fe9a377c3ff20cfd7e77b9b9da12e1df9772c1f685f27"),
    "cpython/msg_16.eml": ("cpython", "msg_16.txt", "fbb4ae9e31ddd26e43b7c051041bb3d9d6bebd418a858da67268920bc672afb9"),
    "cpython/msg_17.eml": ("cpython", "msg_17.txt", "f647152e43fe5e381c71ccd9da9bbd843a854761f8fe60bc6c17b7c0e24e0106"),
    "cpython/msg_18.eml": ("cpython", "msg_18.txt", "f5b4867e0b9c0357e14f488bb45585eccdf47f62b7ff914a0fae73f48cc307c8"),
    "cpython/msg_19.eml": ("cpython", "msg_19.txt", "a5a8f44410fb1085689eaad5a24914e940b0488e0ff2cc3191b972e625522a9e"),
    "cpython/msg_20.eml": ("cpython", "msg_20.txt", "aa9e77f6297e6007745040e9b6a2c2be3880e25206594582e0cd09ef482ee27a"),
    "cpython/msg_21.eml": ("cpython", "msg_21.txt", "395794cdc34731bce3ea1ff032b1c8bcbc275779325999641c052b771a28d8f9"),
    "cpython/msg_22.eml": ("cpython", "msg_22.txt", "4367f6ef8398e92de819ccd8e4938c819c2b24aa08f06cdcc0266bb0ec37eb08"),
    "cpython/msg_23.eml": ("cpython", "msg_23.txt", "cd0dcfaeb8dc99c4ea418b80bf6c13d4aea912fc699aa3b30ddaf938bdb62e04"),
    "cpython/msg_24.eml": ("cpython", "msg_24.txt", "b67ede3fedf08cc4fd20c2cccdea46f2791f95e0ab991d8cf6c7c66ec81e23c3"),
}

SOURCES_MD = f"""# Test corpus: real messages from public sources

Built by the project's scripts/build_corpus.py; read-only input for the tests.

| folder | source |
|---|---|
| `cpython/` | CPython `Lib/test/test_email/data/msg_*.txt` (PSF licence) |
| `mail-parser/` | PyPI sdist `{MAIL_PARSER}`, `tests/mails/` (Apache-2.0) |
| `spamassassin/` | Debian package `spamassassin`, `examples/` (Apache-2.0) |
| `clamav/` | Debian package `clamav-testfiles` (GPL-2.0) |
"""


class SourceUnavailable(Exception):
    """A public source of the corpus could not be reached; the message names it."""


def cpython_data_dir() -> Path:
    """The folder of CPython's ``test_email`` data files.

    Looked for in this interpreter's standard library, then in the
    distribution's (Debian ships it as ``libpython3.X-testsuite``).

    Raises:
        SourceUnavailable: no interpreter here carries the data.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "test" / "test_email" / "data"]
    candidates += sorted(Path("/usr/lib").glob("python3*/test/test_email/data"))
    for candidate in candidates:
        if (candidate / "msg_01.txt").is_file():
            return candidate
    raise SourceUnavailable(
        "CPython's test_email data (the interpreter's 'test' package; "
        "Debian: apt-get install libpython3.11-testsuite)")


def mail_parser_dir(work: Path) -> Path:
    """Download and unpack the ``mail-parser`` sdist; return its ``tests/mails``.

    Raises:
        SourceUnavailable: pip could not download the sdist from PyPI.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", ":all:", "--dest", str(work), MAIL_PARSER],
        capture_output=True, text=True)
    archives = sorted(work.glob("mail_parser-*.tar.gz")) or sorted(work.glob("mail-parser-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise SourceUnavailable(f"the {MAIL_PARSER} sdist from PyPI (pip download failed)")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work, filter="data")
    mails = next(work.glob("mail*parser-*/tests/mails"), None)
    if mails is None:
        raise SourceUnavailable(f"the {MAIL_PARSER} sdist has no tests/mails folder")
    return mails


def debian_dir(path: Path, package: str) -> Path:
    """A folder installed by a Debian package.

    Raises:
        SourceUnavailable: the package is not installed.
    """
    if not path.is_dir():
        raise SourceUnavailable(f"Debian package {package} (apt-get install {package})")
    return path


def build(dest: Path) -> list[str]:
    """Build the corpus into ``dest``; return notes on files that differ.

    Files are written to a temporary folder beside ``dest`` and moved into
    place at the end, so an interrupted build never leaves half a corpus.

    Raises:
        SourceUnavailable: a source could not be reached (nothing is written).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        work = Path(scratch)
        sources = {
            "cpython": cpython_data_dir(),
            "spamassassin": debian_dir(SPAMASSASSIN_EXAMPLES, "spamassassin"),
            "clamav": debian_dir(CLAMAV_TESTFILES, "clamav-testfiles"),
            "mail-parser": mail_parser_dir(work / "download"),
        }
        staging = work / "corpus"
        for relative, (kind, name, digest) in MANIFEST.items():
            source = sources[kind] / name
            if not source.is_file():
                raise SourceUnavailable(f"{name} in {kind} source ({source.parent})")
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            if hashlib.sha256(target.read_bytes()).hexdigest() != digest:
                notes.append(f"{relative} differs from the recorded copy (another release of {kind})")
        (staging / "SOURCES.md").write_text(SOURCES_MD)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return notes


def main(argv: list[str]) -> int:
    """Command line: ``build_corpus.py DEST``; see the module docstring."""
    if len(argv) != 2:
        print("usage: build_corpus.py DEST", file=sys.stderr)
        return 2
    dest = Path(argv[1])
    try:
        notes = build(dest)
    except SourceUnavailable as missing:
        print(f"test corpus: cannot reach {missing}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
