"""`edge-inspect ask`: the error cases exit with 2 before a model loads; one question and a --chat session
with the tiny random-weight VLM (real llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_vlm_ask import VERDICT, _store_ng, _tiny_vlm, calibration, tiny  # noqa: F401 - fixtures



# --- the CLI -------------------------------------------------------------------------------------


def _cli_config(tmp_path, calibration, vlm: dict) -> Path:
    import yaml

    config = {
        "station": "t1",
        "cameras": [{"name": "cam0", "product": "bracket", "source": {"type": "replay", "path": str(tmp_path / "frames")}}],
        "scoring": {"calibration_dir": str(calibration)},
        "evidence": {"dir": str(tmp_path / "evidence")},
        "vlm": vlm,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_errors_exit_2_before_any_model_loads(tmp_path, calibration, capsys):
    from edge_inspect import cli

    inspection_id = _store_ng(tmp_path / "evidence", VERDICT)
    off = _cli_config(tmp_path, calibration, {"enabled": False})
    assert cli.main(["ask", "-c", str(off), inspection_id, "Is it bad?"]) == 2
    assert "vlm_disabled" in capsys.readouterr().err
    on = _cli_config(tmp_path, calibration, {"enabled": True, "mode": "text", "model": str(tmp_path / "none.gguf")})
    assert cli.main(["ask", "-c", str(on), "0" * 32, "Is it bad?"]) == 2
    assert "unknown_inspection" in capsys.readouterr().err
    assert cli.main(["ask", "-c", str(on), inspection_id]) == 2  # no question and no --chat
    assert cli.main(["ask", "-c", str(on), inspection_id, "Is it bad?"]) == 2  # the model file is missing
    assert "vlm.model" in capsys.readouterr().err

@pytest.mark.vlm
def test_cli_ask_and_chat_with_the_tiny_vlm(tiny, tmp_path, calibration, capsys, monkeypatch):
    import io

    from edge_inspect import cli

    inspection_id = _store_ng(tmp_path / "evidence", VERDICT)
    config = _cli_config(tmp_path, calibration, _tiny_vlm(tiny))
    assert cli.main(["ask", "-c", str(config), inspection_id, "Where is the defect?", "--json"]) == 0
    body = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (body["status"], body["kind"], body["turn"]) == ("answered", "location", 1)
    monkeypatch.setattr("sys.stdin", io.StringIO("Is it a scratch?\n" + "x" * 600 + "\nWhy?\nquit\n"))
    assert cli.main(["ask", "-c", str(config), inspection_id, "--chat", "--json"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [(b["kind"], b["turn"]) for b in lines] == [("yes_no", 2), ("open", 3)]
    assert "question_too_long" in captured.err
