namespace kvshard {}
