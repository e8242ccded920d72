"""edge-inspect: few-shot camera inspection for production lines.

The scorer decides *whether* and *where* (patch-memory kNN on pretrained CNN features);
an optional vision-language model says *what*; every result reaches MQTT exactly once.
"""

__version__ = "0.1.0"
