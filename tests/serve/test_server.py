"""`Server` on 127.0.0.1 with a free port, and `dspark serve` building it from its flags."""

from __future__ import annotations

import httpx
import pytest

from dspark import cli
from dspark.serve import Server


def test_dspark_serve_builds_the_server(monkeypatch, capsys):
    seen = {}

    def serve_forever(self):  # instead of blocking: start, ask, stop
        self.start()
        try:
            seen["models"] = httpx.get(self.url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
            seen["health"] = httpx.get(self.url + "/health").status_code
        finally:
            self.stop()

    monkeypatch.setattr(Server, "serve_forever", serve_forever)
    assert cli.main(["serve", "--model", "tiny", "--method", "ngram", "--port", "0", "--max-batch", "2",
                     "--max-seq-len", "128", "--api-key", "k", "--served-model-name", "t"]) == 0
    assert seen["health"] == 200 and [m["id"] for m in seen["models"]["data"]] == ["t"]
    assert seen["models"]["data"][0]["max_model_len"] == 128
    assert "serving 't' (ngram" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [(["--port", "70000"], "--port"), (["--max-waiting", "-1"], "--max-waiting")])
def test_bad_flags_fail_before_loading(flags, message, capsys):
    assert cli.main(["serve", "--model", "tiny", *flags]) == 1
    assert message in capsys.readouterr().err
