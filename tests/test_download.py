"""`blip2 download pretrain` and the workspace: url-list validation (fast) and img2dataset end to end
against a loopback HTTP server on 127.0.0.1 (slow)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.data import workspace
from blip2cli.data.download import (
    detect_format,
    download_pretrain,
    localize_urls,
    summarize,
    validate_url_list,
)
from blip2cli.errors import Blip2Error

# ---------------------------------------------------------------- workspace


def test_workspace_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("BLIP2_HOME", raising=False)
    assert workspace.workspace_root() == Path("blip2-data")
    monkeypatch.setenv("BLIP2_HOME", str(tmp_path / "home"))
    assert workspace.workspace_root() == tmp_path / "home"
    assert workspace.workspace_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_workspace_layout(tmp_path):
    assert workspace.pretrain_dir("cc3m", tmp_path) == tmp_path / "pretrain" / "cc3m"
    assert workspace.capfilt_dir("cc3m", tmp_path) == tmp_path / "capfilt" / "cc3m"
    assert workspace.eval_dir("vqav2", tmp_path) == tmp_path / "eval" / "vqav2"
    assert workspace.runs_dir(root=tmp_path) == tmp_path / "runs"
    assert workspace.runs_dir("stage1", tmp_path) == tmp_path / "runs" / "stage1"


# ---------------------------------------------------------------- url-list validation


def _write(df: pd.DataFrame, path: Path) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    elif name.endswith((".csv", ".csv.gz")):
        df.to_csv(path, index=False)
    elif name.endswith((".tsv", ".tsv.gz")):
        df.to_csv(path, sep="\t", index=False)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_json(path, orient="records")
    return path


@pytest.mark.parametrize(
    "name, fmt",
    [("l.parquet", "parquet"), ("l.csv", "csv"), ("l.tsv", "tsv"), ("l.jsonl", "jsonl"),
     ("l.json", "json"), ("l.tsv.gz", "tsv.gz"), ("l.csv.gz", "csv.gz")],
)
def test_each_format_detected_and_columns_read(tmp_path, name, fmt):
    path = _write(pd.DataFrame({"caption": ["a dog"], "url": ["http://x/1.jpg"]}), tmp_path / name)
    assert detect_format(path) == fmt
    urls = validate_url_list("cc3m", path)
    assert (urls.input_format, urls.url_col, urls.caption_col) == (fmt, "url", "caption")


def test_known_columns_per_dataset(tmp_path):
    laion = _write(pd.DataFrame({"URL": ["u"], "TEXT": ["t"], "similarity": [0.3]}), tmp_path / "laion.parquet")
    urls = validate_url_list("laion", laion)
    assert (urls.url_col, urls.caption_col, urls.extra_columns) == ("URL", "TEXT", ["similarity"])
    coco = _write(pd.DataFrame({"coco_url": ["u"], "caption": ["c"], "image_id": [1]}), tmp_path / "coco.csv")
    assert validate_url_list("coco", coco).url_col == "coco_url"


def test_missing_url_list_is_one_line_error(tmp_path):
    with pytest.raises(Blip2Error, match="url list not found") as err:
        validate_url_list("cc3m", tmp_path / "nope.parquet")
    assert "\n" not in str(err.value)


def test_wrong_columns_names_the_columns_found(tmp_path):
    path = _write(pd.DataFrame({"link": ["u"], "alt": ["t"]}), tmp_path / "l.parquet")
    with pytest.raises(Blip2Error) as err:
        validate_url_list("laion", path)
    msg = str(err.value)
    assert "[link, alt]" in msg and "URL" in msg and "TEXT" in msg and "\n" not in msg
    # explicit overrides make the same file acceptable
    assert validate_url_list("laion", path, url_col="link", caption_col="alt").url_col == "link"


def test_unknown_suffix_and_dataset(tmp_path):
    path = tmp_path / "l.xlsx"
    path.write_text("x")
    with pytest.raises(Blip2Error, match="cannot tell the format"):
        validate_url_list("custom", path)
    with pytest.raises(Blip2Error, match="unknown dataset"):
        validate_url_list("imagenet", path)


def test_unwritable_out_dir_is_one_line_error(tmp_path):
    lst = _write(pd.DataFrame({"url": ["u"], "caption": ["c"]}), tmp_path / "l.csv")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Blip2Error, match="not writable"):
        download_pretrain("custom", lst, blocker / "out")


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from blip2cli.cli import main

    monkeypatch.setattr("sys.argv", ["blip2", "download", "pretrain", "cc3m", "--url-list", str(tmp_path / "x.tsv")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"blip2: error: url list not found: {tmp_path / 'x.tsv'}\n"


def test_localize_urls_turns_paths_into_file_uris(tmp_path):
    (tmp_path / "imgs").mkdir()
    lst = _write(
        pd.DataFrame({
            "url": ["imgs/a.jpg", str(tmp_path / "b.jpg"), "file:///c.jpg", "http://127.0.0.1/d.jpg"],
            "caption": list("abcd"),
        }),
        tmp_path / "l.tsv",
    )
    urls = localize_urls(validate_url_list("custom", lst), tmp_path)
    got = pd.read_parquet(urls.path)["url"].tolist()
    assert got == [(tmp_path / "imgs/a.jpg").as_uri(), (tmp_path / "b.jpg").as_uri(),
                   "file:///c.jpg", "http://127.0.0.1/d.jpg"]
    assert urls.input_format == "parquet"


def test_summarize_groups_failures(tmp_path):
    for i, status in enumerate([{"success": 2, "HTTP Error 404: Not Found": 1},
                                {"success": 1, "<urlopen error [Errno 2] No such file or directory: '/a'>": 1,
                                 "<urlopen error [Errno 2] No such file or directory: '/b'>": 1}]):
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps(
            {"count": sum(status.values()), "successes": status["success"], "status_dict": status}))
    s = summarize(tmp_path)
    assert (s.shards, s.count, s.successes, s.failed) == (2, 6, 3, 3)
    assert s.failures == {"<urlopen error [Errno 2] No such file or directory>": 2, "HTTP Error 404: Not Found": 1}


# ---------------------------------------------------------------- end to end (img2dataset, loopback)

TIMEOUT = 2  # seconds img2dataset waits per request; the slow handler sleeps longer


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buf, format="JPEG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        path = self.path.lstrip("/")
        if path == "slow.jpg":
            time.sleep(TIMEOUT + 2)
            body, ctype = _jpeg((0, 0, 0)), "image/jpeg"
        elif path == "page.html":
            body, ctype = b"<html>not an image</html>", "text/html"
        elif path in self.images:
            body, ctype = self.images[path], "image/jpeg"
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


def _read_shards(out: Path) -> dict[str, str]:
    """url -> caption for every image in every tar (checks each sample has jpg, txt and json)."""
    got = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {name.split(".")[0] for name in members}
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert min(img.size) == 32  # keep_ratio: shorter side = image size, aspect kept
            assert img.size == (48, 32)
            got[meta["url"]] = members[f"{key}.txt"].decode()
            assert meta["caption"] == got[meta["url"]]
    return got


@contextlib.contextmanager
def _serving(handler):
    """A loopback HTTP server on a free port, in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.slow
def test_download_pretrain_custom_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    good = {f"img{i}.jpg": _jpeg((40 * i, 100, 200)) for i in range(4)}
    _Handler.images = good
    with _serving(_Handler) as base:
        local_dir = tmp_path / "local"
        local_dir.mkdir()
        (local_dir / "rel.jpg").write_bytes(_jpeg((9, 9, 9)))
        (local_dir / "abs.jpg").write_bytes(_jpeg((200, 9, 9)))
        rows = [(f"{base}/{name}", f"caption of {name}") for name in good]
        rows += [
            (f"{base}/missing.jpg", "404"),
            (f"{base}/page.html", "not an image"),
            (f"{base}/slow.jpg", "times out"),
            ("local/rel.jpg", "a relative local path"),
            ((local_dir / "abs.jpg").as_uri(), "a file url"),
        ]
        lst = tmp_path / "list.jsonl"
        pd.DataFrame(rows, columns=["url", "caption"]).assign(id=range(len(rows))).to_json(
            lst, orient="records", lines=True)
        out = tmp_path / "ws" / "pretrain" / "custom"
        args = ["download", "pretrain", "custom", "--url-list", str(lst), "--root", str(tmp_path / "ws"),
                "--image-size", "32", "--threads", "4", "--shard-size", "3", "--timeout", str(TIMEOUT)]

        t0 = time.monotonic()
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        first_seconds = time.monotonic() - t0
        expected = {url: cap for url, cap in rows if "of img" in cap}
        expected[(local_dir / "rel.jpg").as_uri()] = "a relative local path"
        expected[(local_dir / "abs.jpg").as_uri()] = "a file url"
        assert _read_shards(out) == expected
        s = summarize(out)
        assert (s.shards, s.count, s.successes, s.failed) == (3, 9, 6, 3)
        assert s.failures["HTTP Error 404: Not Found"] == 1
        assert s.failures["Image decoding error"] == 1
        assert any("timed out" in reason for reason in s.failures)
        assert "successes" in result.output and "HTTP Error 404" in result.output
        assert not list(out.glob("*.json")) or all(p.name.endswith("_stats.json") for p in out.glob("*.json"))

        # Rerun after a simulated kill in the middle of shard 1: its stats file is missing, so
        # only shard 1 is redone; finished shards are left untouched.
        mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02].*")}
        (out / "00001_stats.json").unlink()
        summary = download_pretrain("custom", lst, out, image_size=32, threads=4, shard_size=3,
                                    timeout=TIMEOUT, quiet=True)
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02].*")} == mtimes
        assert (out / "00001_stats.json").exists()
        assert (summary.shards, summary.shards_skipped, summary.successes) == (3, 2, 6)
        assert _read_shards(out) == expected
        print(f"first run {first_seconds:.1f}s, resume {summary.seconds:.1f}s")


@pytest.mark.slow
def test_interrupted_download_is_reported_and_a_rerun_completes_exactly(tmp_path, monkeypatch):
    """img2dataset exits 0 when interrupted; blip2 reports the interruption (exit 130) and the same command
    then finishes with every image exactly once."""
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    images = {f"img{i}.jpg": _jpeg((20 * i, 100, 200)) for i in range(12)}

    class Slow(_Handler):
        def do_GET(self):  # noqa: N802
            time.sleep(0.4)  # slow enough to interrupt mid-way
            super().do_GET()

    _Handler.images = images
    with _serving(Slow) as base:
        lst = tmp_path / "list.csv"
        pd.DataFrame({"url": [f"{base}/{n}" for n in images], "caption": list(images)}).to_csv(lst, index=False)
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "blip2cli", "download", "pretrain", "custom", "--url-list", str(lst),
               "--out", str(out), "--image-size", "32", "--threads", "1", "--shard-size", "2"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list(out.glob("*_stats.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        assert "blip2: interrupted:" in err and "rerun the same command" in err
        done = len(list(out.glob("*_stats.json")))
        assert 1 <= done < 6

        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        s = summarize(out)
        assert (s.shards, s.count, s.successes, s.failed) == (6, 12, 12, 0)
        keys = []
        for tar_path in sorted(out.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                keys += [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
        assert len(keys) == len(set(keys)) == 12
