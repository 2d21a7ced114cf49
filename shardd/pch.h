// Precompiled header for shardd/ (the shardd tests and the benchmark reuse it):
// LibTorch's headers dominate compile time.
#pragma once
#include <torch/nn.h>
#include <torch/optim.h>
#include <torch/serialize.h>
#include <torch/types.h>
#include <torch/utils.h>
#include <torch/cuda.h>
