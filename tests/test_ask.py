"""`blip2 ask`: answers only on stdout, one-line errors for bad input, the interactive loop."""

from __future__ import annotations

import shutil
import sys

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app, main
from blip2cli.inference import conversation_prompt
from tests import tiny


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["blip2", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    tiny.random_images(1)[0].save(path)
    return path


def test_answer_only_on_stdout(monkeypatch, capsys, hf_opt_dir, image_file):
    code, out, _ = run_main(monkeypatch, capsys, "ask", str(image_file), "what is it?", "--model", str(hf_opt_dir),
                            "--num-beams", "1", "--max-new-tokens", "3")
    assert code in (0, None)
    assert len(out.splitlines()) == 1 and out.strip()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, img, tmp: ["ask", str(tmp / "missing.jpg"), "--model", str(d)], "image not found"),
        (lambda d, img, tmp: ["ask", str(tmp / "text.jpg"), "--model", str(d)], "not an image"),
        (lambda d, img, tmp: ["ask", str(tmp / "empty"), "--model", str(d)], "no images found"),  # a folder: many
        (lambda d, img, tmp: ["ask", str(img), "--model", str(tmp / "nowhere")], "no checkpoint directory"),
        (lambda d, img, tmp: ["ask", str(img), "--model", str(tmp / "no-tokenizer")], "no tokenizer"),
        (lambda d, img, tmp: ["ask", str(img), "--model", str(img)], "is a file"),
        (lambda d, img, tmp: ["ask", str(img), "--model", "nobody/blip2-does-not-exist"],
         "`blip2 download model nobody/blip2-does-not-exist`"),
        (lambda d, img, tmp: ["ask", str(img), "--model", str(d), "--dtype", "float8"], "unknown dtype"),
        (lambda d, img, tmp: ["ask", str(img), "--model", str(d), "--device", "gpu0"], "unknown device"),
        (lambda d, img, tmp: ["ask", str(img), "q?", "--model", str(d), "--prompt-template", "Q:"], "has no '{}'"),
    ],
)
def test_bad_input_gives_one_line(monkeypatch, capsys, tmp_path, hf_opt_dir, image_file, make_args, message):
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    (tmp_path / "empty").mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_opt_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    code, out, err = run_main(monkeypatch, capsys, *make_args(hf_opt_dir, image_file, tmp_path))
    assert code == 1
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("blip2: error:") and message in lines[0]
    assert "Traceback" not in err


def test_interactive_keeps_context(hf_opt_dir, image_file):
    result = CliRunner().invoke(
        app,
        ["ask", str(image_file), "-i", "--model", str(hf_opt_dir), "--num-beams", "1", "--max-new-tokens", "2"],
        input="what is it?\n/reset\nwhere?\n/caption\n\n",
    )
    assert result.exit_code == 0, result.output
    # Two answers and a caption on stdout; the banner goes to stderr.
    assert len(result.stdout.splitlines()) == 3, result.stdout


def test_interactive_commands_are_confirmed_or_rejected(hf_opt_dir, image_file, tmp_path):
    """`ask -i`: /reset and /image say what they did; an unknown /command is refused (never sent to the
    model as a question) and the commands are listed."""
    other = tmp_path / "other.jpg"
    tiny.random_images(2)[1].save(other)
    result = CliRunner().invoke(
        app,
        ["ask", str(image_file), "-i", "--model", str(hf_opt_dir), "--num-beams", "1", "--max-new-tokens", "2"],
        input=f"/captoin\n/reset\n/image {other}\n/image\n/image {tmp_path / 'missing.jpg'}\n/help\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # no answer was generated: every line was a command
    err = result.stderr
    assert "unknown command /captoin" in err and "/image PATH" in err
    assert "conversation forgotten" in err
    assert f"now asking about {other}" in err
    assert "/image needs a path" in err
    assert "image not found" in err
    assert "forget the conversation" in err  # /help lists what each command does


def test_conversation_prompt():
    template = "Question: {} Answer:"
    assert conversation_prompt(template, "why?") == "Question: why? Answer:"
    assert (
        conversation_prompt(template, "and now?", [("what is it?", "a dog"), ("colour?", "brown")])
        == "Question: what is it? Answer: a dog Question: colour? Answer: brown Question: and now? Answer:"
    )


def test_image_urls(tmp_path, image_file):
    """http(s) images are fetched; a 404 is a one-line error (loopback server only)."""
    import functools
    import http.server
    import threading

    from blip2cli.errors import ImageError
    from blip2cli.images import load_image

    shutil.copy(image_file, tmp_path / "photo.jpg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_image(f"{base}/photo.jpg").size == tiny.random_images(1)[0].size
        with pytest.raises(ImageError, match="cannot fetch"):
            load_image(f"{base}/missing.jpg")
    finally:
        server.shutdown()
        server.server_close()
