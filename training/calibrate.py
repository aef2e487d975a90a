"""``python -m training.calibrate``: INT8 / FP16 variants of an ONNX model (see :mod:`engines.deploy.calibrate`).

The calibration code is a deployment tool and lives in ``engines.deploy`` so that the runtime can use
it without PyTorch; this module is its command line under ``training``, where the product card puts
engine building and calibration.
"""

from engines.deploy.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
