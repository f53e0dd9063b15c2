// Transitional: the families still under csrc/ops see common/checks.h here.
#pragma once
#include "common/checks.h"
#include "cuda/types.h"
