"""What only serves decoding: the C decoding step and its build (native.py), packed weights (packed.py), int8
weights (int8.py) and int8 model folders (quantize.py), and the whole-step fast path (fastdecode.py). Which path
runs is measured once per processor (calibrate.py). Importing this package imports none of them."""
