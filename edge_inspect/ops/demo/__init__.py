"""`edge-inspect demo`: the whole product on one machine in under a minute, with nothing to install.

A simulated line: good and defective parts rendered from real photos (with the defect's pixel
mask known), a product calibrated from a few good parts, an MQTT broker, the real daemon
(`edge-inspect run` in a subprocess, replaying the frames like a camera), and a subscriber that
prints every result as it arrives and checks it against what was painted into the frame.

Example::

    settings = DemoSettings(workdir=Path("demo-run"), engines_dir=Path("engines"))
    exit_code = run_demo(settings)          # prints the stream, a summary, writes report.html

Everything the demo writes goes to its workdir (marked with a `.edge-inspect-demo` file, so a
folder that is not a demo workdir is never cleared). The one exception is the pretrained backbone
ONNX, which is shared through `engines_dir` (the `engines/` folder every other command uses), so
only the first demo on a machine pays for exporting it. The generated dataset is cached in the
workdir; calibration, spool, evidence, results and report are redone on every run.
"""

from .data import (
    DEFAULT_CATEGORY,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    MARKER,
    SHORT_FPS,
    SHORT_FRAMES,
    DemoFrame,
    DemoSettings,
)
from .run import run_demo
from .stream import Console, ResultStream, judge, region_on_defect, summarize_demo

__all__ = [
    "DEFAULT_CATEGORY", "DEFAULT_FPS", "DEFAULT_FRAMES", "MARKER", "SHORT_FPS", "SHORT_FRAMES", "Console", "DemoFrame",
    "DemoSettings", "ResultStream", "judge", "region_on_defect", "run_demo", "summarize_demo",
]
