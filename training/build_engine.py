"""``python -m training.build_engine``: a TensorRT engine file from an ONNX model (:mod:`engines.deploy.build_engine`).

The builder is a deployment tool and lives in ``engines.deploy`` so that the TensorRT backend can
rebuild a stale plan without importing training code; this module is its command line under
``training``, where the product card puts engine building and calibration.
"""

from engines.deploy.build_engine import main

if __name__ == "__main__":
    raise SystemExit(main())
