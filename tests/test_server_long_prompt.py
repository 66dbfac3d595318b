"""A long prompt must not stall the other streams of a real ``kiln serve``: an 8,000-token
prompt is prefilled in chunks sized to about ``--prefill-step-ms`` each (runtime/prefill_budget.py)
with a decode step of the running stream between them, so that stream's longest gap between
tokens stays under 2 s (the hardening issue's bound) on both backends. The figure on an idle
machine with the default two threads is in docs/design-notes.md."""
import json
import threading
import time

import numpy as np
import pytest

from test_server_lifecycle import COUNTING, Served

pytest.importorskip("fastapi")

LONG = 8000
MAX_GAP_S = 2.0


@pytest.fixture(scope="module", params=["tvm", "onnxrt"])
def artifact(request, smollm2_gguf, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    out = tmp_path_factory.mktemp("long") / f"smollm2-{request.param}.kiln"
    return kiln_compile(smollm2_gguf, target="cpu", output=out, backend=request.param)


def test_an_8000_token_prompt_leaves_a_running_stream_short_gaps(artifact):
    # one thread: with the suite's workers beside it, two threads' parallel loops wait on
    # whichever is descheduled (stragglers), noise a chunk's size cannot foresee
    srv = Served(artifact, "--max-batch", "2", "--threads", "1")
    arrivals, stop = [], threading.Event()

    def stream():
        body = {"prompt": COUNTING, "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
        with srv.post(body, timeout=900) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    arrivals.append(time.perf_counter())
                if stop.is_set():
                    return

    try:
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        srv.wait_running(1)
        while len(arrivals) < 3:
            time.sleep(0.05)
        began = time.perf_counter()
        with srv.post({"prompt": list(range(100, 100 + LONG)), "max_tokens": 1, "temperature": 0},
                      timeout=900) as r:
            answer = json.loads(r.read())
        ended = time.perf_counter()
        stop.set()
        t.join(60)
        assert answer["usage"]["prompt_tokens"] == LONG
        during = [a for a in arrivals if began <= a <= ended]
        gaps = [b - a for a, b in zip([began] + during, during + [ended])]
        print(f"{artifact.name}: prefill {ended - began:.1f} s, {len(during)} tokens streamed meanwhile, "
              f"longest gap {max(gaps):.2f} s")
        assert len(during) >= 5
        worst = int(np.argmax(gaps))
        assert max(gaps) <= MAX_GAP_S, (f"a gap of {max(gaps):.2f} s (gap {worst} of {len(gaps)}; prefill "
                                        f"{ended - began:.1f} s; gaps {[round(g, 2) for g in gaps]})")
    finally:
        stop.set()
        srv.close()
