"""`blip2 download eval`: resumable verified downloads from a loopback HTTP server (127.0.0.1 only) and
the layout + manifest.json `blip2 eval` reads, built from tiny files in each official format."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from blip2cli.data import eval_download as ed
from blip2cli.data.eval_download import download_eval, download_file, extract
from blip2cli.errors import Blip2Error


# ----------------------------------------------------------------------------- loopback server
class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root`` with ``Range: bytes=N-`` support; can drop a connection half-way."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        srv = self.server
        name = self.path.lstrip("/")
        srv.requests.append((name, self.headers.get("Range")))
        path = srv.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in srv.truncate:  # announce everything, send half, hang up
            srv.truncate.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root, httpd.requests, httpd.truncate, httpd.ignore_range = root, [], set(), False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# ----------------------------------------------------------------------------- single files
def test_resume_partial_file_with_http_range(server, tmp_path):
    payload = bytes(range(256)) * 400  # 102,400 bytes
    (server.root / "big.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "big.bin"
    dest.parent.mkdir()
    dest.with_name("big.bin.part").write_bytes(payload[:30_000])
    seen = []
    result = download_file(f"{server.url}/big.bin", dest, on_bytes=lambda n, total: seen.append(n))
    assert dest.read_bytes() == payload and not dest.with_name("big.bin.part").exists()
    assert server.requests == [("big.bin", "bytes=30000-")]
    assert result.downloaded == len(payload) - 30_000 and sum(seen) == len(payload)
    # Complete already: no request at all.
    assert download_file(f"{server.url}/big.bin", dest).skipped and len(server.requests) == 1


def test_dropped_connection_keeps_part_and_rerun_resumes(server, tmp_path):
    payload = b"x" * 50_000 + b"y" * 50_000
    (server.root / "f.zip").write_bytes(payload)
    server.truncate.add("f.zip")
    dest = tmp_path / "f.zip"
    with pytest.raises(Blip2Error, match=r"rerun to resume") as info:
        download_file(f"{server.url}/f.zip", dest, retries=0, timeout=5)
    assert "\n" not in str(info.value)
    part = tmp_path / "f.zip.part"
    assert not dest.exists() and part.stat().st_size == 50_000
    download_file(f"{server.url}/f.zip", dest, retries=0, timeout=5)
    assert dest.read_bytes() == payload
    assert server.requests[-1] == ("f.zip", "bytes=50000-")


def test_retry_within_one_call_resumes(server, tmp_path):
    payload = b"abc" * 10_000
    (server.root / "g.bin").write_bytes(payload)
    server.truncate.add("g.bin")
    download_file(f"{server.url}/g.bin", tmp_path / "g.bin", retries=1, timeout=5)
    assert (tmp_path / "g.bin").read_bytes() == payload
    assert [r for _, r in server.requests] == [None, f"bytes={len(payload) // 2}-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    payload = b"0123456789" * 1000
    (server.root / "h.bin").write_bytes(payload)
    server.ignore_range = True
    (tmp_path / "h.bin.part").write_bytes(b"garbage!" * 10)
    download_file(f"{server.url}/h.bin", tmp_path / "h.bin")
    assert (tmp_path / "h.bin").read_bytes() == payload


def test_size_and_checksum_mismatch_keep_nothing(server, tmp_path):
    payload = b"official bytes" * 100
    (server.root / "a.json").write_bytes(payload)
    url = f"{server.url}/a.json"
    with pytest.raises(Blip2Error, match="published size is 9") as info:
        download_file(url, tmp_path / "a.json", size=9)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "a.json.part").exists()

    with pytest.raises(Blip2Error, match="failed verification .sha256") as info:
        download_file(url, tmp_path / "a.json", sha256="0" * 64)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "a.json.part").exists()

    with pytest.raises(Blip2Error, match="failed verification .md5"):
        download_file(url, tmp_path / "a.json", md5="0" * 32)
    assert not list(tmp_path.glob("a.json*"))

    good = download_file(url, tmp_path / "a.json", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                         md5=hashlib.md5(payload).hexdigest())
    assert good.path.read_bytes() == payload


def test_http_error_is_one_line(server, tmp_path):
    with pytest.raises(Blip2Error, match=r"HTTP 404") as info:
        download_file(f"{server.url}/missing.zip", tmp_path / "missing.zip")
    assert "\n" not in str(info.value) and not list(tmp_path.glob("missing*"))


def test_extract_members_flattened_and_zip_slip_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("deep/dir/wanted.json", "{}")
        zf.writestr("other.json", "{}")
    written = extract(archive, tmp_path / "x", members=["wanted.json"])
    assert written == [tmp_path / "x" / "wanted.json"] and not (tmp_path / "x" / "other.json").exists()
    with pytest.raises(Blip2Error, match="lacks absent.json"):
        extract(archive, tmp_path / "y", members=["absent.json"])
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(Blip2Error, match="outside"):
        extract(evil, tmp_path / "z")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- official formats
def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _zip(path: Path, files: dict[str, bytes | str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def _vqa_files(prefix: str, image_id: int) -> tuple[str, str]:
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "questions": [{"image_id": image_id, "question": "What colour is it?", "question_id": image_id * 10}]}
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
    annotations = {"info": {}, "annotations": [{"question_id": image_id * 10, "image_id": image_id,
                                                "question_type": "what color", "answer_type": "other",
                                                "multiple_choice_answer": "red", "answers": answers}]}
    return json.dumps(questions), json.dumps(annotations)


def _karpathy(dataset: str) -> str:
    if dataset == "coco":
        images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": n, "split": split,
                   "cocoid": i, "sentences": [{"raw": "A red square.", "tokens": ["a", "red", "square"]}]}
                  for n, (i, split) in enumerate([(42, "test"), (43, "val"), (9, "train")])]
    else:
        images = [{"filename": f"{i}.jpg", "imgid": n, "split": split,
                   "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}]}
                  for n, (i, split) in enumerate([(1000092795, "test"), (10002456, "val")])]
    return json.dumps({"images": images, "dataset": dataset})


def _publish_official_files(root: Path) -> None:
    """Tiny copies of every official file, under their official names (as a --mirror would hold them)."""
    q, a = _vqa_files("v2", 42)
    _zip(root / "v2_Questions_Val_mscoco.zip", {"v2_OpenEnded_mscoco_val2014_questions.json": q})
    _zip(root / "v2_Annotations_Val_mscoco.zip", {"v2_mscoco_val2014_annotations.json": a})
    _zip(root / "OpenEnded_mscoco_val2014_questions.json.zip", {"OpenEnded_mscoco_val2014_questions.json": q})
    _zip(root / "mscoco_val2014_annotations.json.zip", {"mscoco_val2014_annotations.json": a})
    _zip(root / "val2014.zip", {f"val2014/COCO_val2014_{i:012d}.jpg": _jpeg() for i in (42, 43)})
    gqa = {"201307251": {"imageId": "n15740", "question": "Is it red?", "answer": "yes", "fullAnswer": "Yes."}}
    _zip(root / "questions1.2.zip", {"testdev_balanced_questions.json": json.dumps(gqa),
                                      "val_balanced_questions.json": json.dumps(gqa),
                                      "train_all_questions/train_all_questions_0.json": "{}"})
    _zip(root / "images.zip", {"images/n15740.jpg": _jpeg(), "images/n1.jpg": _jpeg()})
    _zip(root / "caption_datasets.zip", {"dataset_coco.json": _karpathy("coco"),
                                          "dataset_flickr30k.json": _karpathy("flickr30k"),
                                          "dataset_flickr8k.json": "{}"})
    nocaps = {"licenses": [], "info": {},
              "images": [{"id": n, "file_name": f"{name}.jpg", "open_images_id": name, "domain": "in-domain",
                          "height": 16, "width": 16,
                          "coco_url": f"https://s3.amazonaws.com/nocaps/val/{name}.jpg"}
                         for n, name in enumerate(["0013ea2087020901", "00223fe9b4ca5e89"])],
              "annotations": [{"image_id": 0, "id": 0, "caption": "a red square"},
                              {"image_id": 1, "id": 1, "caption": "a blue square"}]}
    (root / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps))
    for image in nocaps["images"]:
        (root / image["file_name"]).write_bytes(_jpeg((30, 30, 200)))


def _check_manifest(out: Path, task: str) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == task
    for split, entry in manifest["splits"].items():
        for key in ("questions", "annotations", "images"):
            if key in entry:
                assert not Path(entry[key]).is_absolute()
                assert (out / entry[key]).exists(), (split, key, entry[key])
        images = out / entry["images"]
        if "image_pattern" in entry:
            ann = json.loads((out / entry["questions"]).read_text())
            first = ann["questions"][0]["image_id"] if "questions" in ann else next(iter(ann.values()))["imageId"]
            assert (images / entry["image_pattern"].format(image_id=first)).is_file()
        else:
            ann = json.loads((out / entry["annotations"]).read_text())
            for im in ann["images"]:
                if task == "nocaps":
                    assert (images / im["file_name"]).is_file()
                elif im["split"] == split:
                    assert (images / im.get("filepath", "") / im["filename"]).is_file()
    return manifest


@pytest.mark.parametrize(
    "task, splits",
    [("vqav2", {"val"}), ("okvqa", {"val", "test"}), ("gqa", {"testdev"}), ("coco", {"val", "test"}),
     ("coco_retrieval", {"val", "test"}), ("nocaps", {"val"})],
)
def test_download_eval_layout_and_manifest(server, tmp_path, task, splits):
    _publish_official_files(server.root)
    out = tmp_path / "eval" / task
    result = download_eval(task, out, mirror=server.url, timeout=5, console=_quiet())
    manifest = _check_manifest(out, task)
    assert set(manifest["splits"]) == splits and result.bytes_downloaded > 0
    if task == "vqav2":
        assert manifest["splits"]["val"] == {
            "questions": "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
            "annotations": "annotations/v2_mscoco_val2014_annotations.json",
            "images": "images/val2014",
            "image_pattern": "COCO_val2014_{image_id:012d}.jpg",
        }
    if task == "gqa":  # only the wanted members of questions1.2.zip were unpacked
        assert sorted(p.name for p in (out / "annotations").iterdir()) == [
            "testdev_balanced_questions.json", "val_balanced_questions.json"]
        assert manifest["splits"]["testdev"]["images"] == "images"
    if task in ("coco", "coco_retrieval"):
        assert manifest["splits"]["test"] == {"annotations": "annotations/dataset_coco.json", "images": "images"}
    if task == "nocaps":
        assert manifest["splits"]["val"] == {"annotations": "annotations/nocaps_val_4500_captions.json",
                                             "images": "images/val"}
    # A rerun fetches nothing.
    count = len(server.requests)
    again = download_eval(task, out, mirror=server.url, timeout=5, console=_quiet())
    assert again.bytes_downloaded == 0 and len(server.requests) == count


def test_coco_retrieval_reuses_coco_files_in_the_workspace(server, tmp_path):
    _publish_official_files(server.root)
    out, data = ed.data_dir_for("coco_retrieval", None, tmp_path / "ws")
    assert (out, data) == (tmp_path / "ws" / "eval" / "coco_retrieval", tmp_path / "ws" / "eval" / "coco")
    download_eval("coco", data, mirror=server.url, console=_quiet(), delete_archives=True)
    assert not (data / "downloads" / "val2014.zip").exists()  # --delete-archives
    count = len(server.requests)
    download_eval("coco_retrieval", out, data_dir=data, mirror=server.url, console=_quiet())
    assert len(server.requests) == count  # nothing fetched twice
    manifest = _check_manifest(out, "coco_retrieval")
    assert manifest["splits"]["test"]["annotations"] == "../coco/annotations/dataset_coco.json"


def test_flickr30k_prints_manual_steps_then_accepts_the_archive(server, tmp_path):
    _publish_official_files(server.root)
    out = tmp_path / "flickr30k"
    buf = io.StringIO()
    with pytest.raises(Blip2Error, match="must be fetched by hand") as info:
        download_eval("flickr30k", out, mirror=server.url, console=Console(file=buf, width=300))
    assert "\n" not in str(info.value)
    text = buf.getvalue()
    assert "https://shannon.cs.illinois.edu/DenotationGraph/" in text
    assert str(out / "downloads") in text and "flickr30k-images.tar.gz" in text and str(out / "images") in text
    assert (out / "annotations" / "dataset_flickr30k.json").is_file()  # automatic part done
    assert not (out / "manifest.json").exists()

    with tarfile.open(out / "downloads" / "flickr30k-images.tar.gz", "w:gz") as tar:
        for name in ("1000092795.jpg", "10002456.jpg"):
            data = _jpeg()
            info_ = tarfile.TarInfo(f"flickr30k-images/{name}")
            info_.size = len(data)
            tar.addfile(info_, io.BytesIO(data))
    download_eval("flickr30k", out, mirror=server.url, console=_quiet())
    manifest = _check_manifest(out, "flickr30k")
    assert manifest["splits"]["test"] == {"annotations": "annotations/dataset_flickr30k.json",
                                          "images": "images/flickr30k-images"}


def test_missing_images_in_archive_is_an_error_not_a_manifest(server, tmp_path):
    _publish_official_files(server.root)
    _zip(server.root / "val2014.zip", {"val2014/COCO_val2014_000000000001.jpg": _jpeg()})  # not image 42
    with pytest.raises(Blip2Error, match="COCO_val2014_000000000042.jpg not found"):
        download_eval("vqav2", tmp_path / "v", mirror=server.url, console=_quiet())
    assert not (tmp_path / "v" / "manifest.json").exists()


def test_unwritable_out_dir_and_bad_task_are_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Blip2Error, match="not writable"):
        download_eval("vqav2", blocker / "out", console=_quiet())
    with pytest.raises(Blip2Error, match="unknown evaluation task 'imagenet'"):
        download_eval("imagenet", tmp_path / "x")
    with pytest.raises(Blip2Error, match="no split 'train2'"):
        download_eval("vqav2", tmp_path / "x", splits=["train2"])


def test_cli_eval_download_dry_run_and_error(server, tmp_path, monkeypatch, capsys):
    from blip2cli.cli import app, main

    _publish_official_files(server.root)
    result = CliRunner().invoke(app, ["download", "eval", "okvqa", "--root", str(tmp_path / "ws"),
                                      "--mirror", server.url, "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ws" / "eval" / "okvqa" / "manifest.json").is_file()
    dry = CliRunner().invoke(app, ["download", "eval", "vqav2", "--dry-run", "--root", str(tmp_path / "ws2")])
    assert dry.exit_code == 0
    assert "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip" in dry.output
    assert "http://images.cocodataset.org/zips/val2014.zip" in dry.output
    assert not (tmp_path / "ws2").exists()

    monkeypatch.setattr("sys.argv", ["blip2", "download", "eval", "flickr30k", "--out", str(tmp_path / "f"),
                                     "--mirror", server.url])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("blip2: error: flickr30k: the Flickr30k images must be fetched by hand")
    assert "DenotationGraph" in err
