// The fusenorm_simt library and the emulator's controls; the ops are in layer_norm.cpp and
// rms_norm.cpp, one per norm as in csrc/cuda/.
#include "simt_lib.h"

FUSENORM_SIMT_LIBRARY(FUSENORM_SIMT_NS, m) { FUSENORM_SIMT_CONTROLS(m); }
