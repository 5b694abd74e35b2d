"""edge-agent: serve ONNX models over MQTT on edge boards.

The daemon reads a model directory, answers Open Inference Protocol requests over MQTT and
keeps each model on the richest variant the board can afford.
"""

__version__ = "0.1.0"
