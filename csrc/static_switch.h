// Compile-time switches: turn a runtime flag into a constexpr so that a kernel is instantiated
// only with the terms it needs (an absent A or P drops its loads, FMAs and registers).
//
//   REFT_BOOL_SWITCH(has_a, HAS_A, [&] { launch<HAS_A>(...); });
//
// Switched at compile time: the matrices A and P (C, or B when tied) of the low-rank kernels,
// which shape their inner loops and register use; `C is B` in the parameter-gradient kernel;
// RED's scale and bias. The vectors a and c stay runtime checks: each is read once per latent
// value, not per element.
#pragma once

#define REFT_BOOL_SWITCH(COND, NAME, ...)      \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool NAME = true;       \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool NAME = false;      \
      return __VA_ARGS__();                    \
    }                                          \
  }()

// Rank chunk of the parameter-gradient kernel: CHUNK is param_rank_chunk(r), one of 4, 8, 16.
#define REFT_RANK_CHUNK_SWITCH(CHUNK, NAME, ...) \
  [&] {                                        \
    if ((CHUNK) == 4) {                        \
      constexpr static int NAME = 4;           \
      return __VA_ARGS__();                    \
    } else if ((CHUNK) == 8) {                 \
      constexpr static int NAME = 8;           \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static int NAME = 16;          \
      return __VA_ARGS__();                    \
    }                                          \
  }()
