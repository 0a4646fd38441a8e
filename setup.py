from setuptools import setup

# Everything declarative lives in pyproject.toml; setup.py only wires the
# cffi extensions, built from csrc/: restore._engine (the engine) and
# restore._testbed (the test guest, the bare handler and rs_mem_*, for tests,
# benchmarks and `restore try`).
setup(cffi_modules=["csrc/build_cffi.py:engine", "csrc/build_cffi.py:testbed"])
