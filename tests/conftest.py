"""Test configuration: standalone scripts that tests start in subprocesses are not collected."""

collect_ignore = [
    "ddp_script.py",
    "keras_determinism.py",
    "keras_backend_script.py",
    "keras_mirrored.py",
]
