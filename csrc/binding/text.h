// Error text of the operators' checks (fastsam._C binding): every message names the operator,
// the list, the index and what was expected.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// Error text, built without iostreams. c10::str formats numbers through std::ostream, and in an
// extension built by a toolchain that links part of libstdc++ into it (the lent H100 image's
// /opt/gcc, 2026-11-23) formatting an integer that way crashed the process (SIGSEGV in the
// num_put facet) instead of raising. TORCH_CHECK passes one std::string through untouched.
std::string text(const char* s) { return s; }
std::string text(const std::string& s) { return s; }
std::string text(std::string_view s) { return std::string(s); }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
std::string text(I v) {
  return std::to_string(v);
}
std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
std::string text(at::IntArrayRef values) {
  std::string out = "[";
  for (size_t k = 0; k < values.size(); ++k) out += (k ? ", " : "") + std::to_string(values[k]);
  return out + "]";
}
std::string text(c10::Device d) { return d.str(); }
std::string text(c10::DeviceType t) { return c10::DeviceTypeName(t, /*lower_case=*/true); }
std::string text(at::ScalarType t) { return c10::toString(t); }
std::string text(at::Layout l) {
  switch (l) {
    case at::kStrided: return "strided";
    case at::kSparse: return "sparse COO";
    case at::kSparseCsr: return "sparse CSR";
    default: return "layout " + std::to_string(static_cast<int>(l));
  }
}
template <class... A>
std::string msg(const A&... parts) {
  std::string out;
  ((out += text(parts)), ...);
  return out;
}

}  // namespace
}  // namespace fastsam
