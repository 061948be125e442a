namespace kvshard {
const char* Version() { return "0.1.0"; }
}  // namespace kvshard
