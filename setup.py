from setuptools import setup

# Everything declarative lives in pyproject.toml; setup.py only wires the
# cffi extension (restore._engine, built from csrc/).
setup(cffi_modules=["csrc/build_engine.py:ffibuilder"])
