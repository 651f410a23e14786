// Element types the core handles, moved as raw bit patterns (fp16 and bf16 as uint16_t), with
// conversions that round to nearest even like torch does. Kept inline: the reference SpMM
// converts every activation it reads.
#pragma once

#include <cstdint>
#include <cstring>

namespace vnm {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // Subnormal half: value = mant * 2^-24, exact in float.
  const float mag = float(mant) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or nan (keep nan quiet and non-zero)
    return uint16_t(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u | ((abs >> 13) & 0x3FFu) : 0u));
  }
  if (abs >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: round abs * 2^24 to an integer, ties to even.
    // Adding 0.5 in float, 2^-1 below the half ulp, does the rounding exactly (the magic-number
    // trick: the float sum lands on an integer multiple of 2^-24 after rounding).
    const float scaled = bits_to_float(abs) + 0.5f;
    return uint16_t(sign | uint16_t(float_to_bits(scaled) - 0x3F000000u));
  }
  // Normal: drop 13 mantissa bits with round to nearest even; a carry into the exponent is right.
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
  return uint16_t(sign | uint16_t((rounded - 0x38000000u) >> 13));
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);  // quiet nan
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Reads element i of a buffer of the given dtype as float.
inline float load_as_float(DType t, const void* data, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f16: return half_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// Writes float v as element i of a buffer of the given dtype (round to nearest even).
inline void store_from_float(DType t, void* data, int64_t i, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(data)[i] = v; break;
    case DType::f16: static_cast<uint16_t*>(data)[i] = float_to_half(v); break;
    case DType::bf16: static_cast<uint16_t*>(data)[i] = float_to_bf16(v); break;
  }
}

// True for NaN or +-Inf (element i of a buffer of the given dtype).
inline bool is_nonfinite(DType t, const void* data, int64_t i) {
  switch (t) {
    case DType::f32:
      return (static_cast<const uint32_t*>(data)[i] & 0x7F800000u) == 0x7F800000u;
    case DType::f16:
      return (static_cast<const uint16_t*>(data)[i] & 0x7C00u) == 0x7C00u;
    case DType::bf16:
      return (static_cast<const uint16_t*>(data)[i] & 0x7F80u) == 0x7F80u;
  }
  return false;
}

}  // namespace vnm
