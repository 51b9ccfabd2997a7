// GENERATED from alsals_fused/backends/base.py by
//   python -m alsals_fused.backends.cuda_tools --write-header
// Do not edit: tests/test_cuda.py checks that it is current.  The names are base.py's
// (Ctl::SCALE is Ctl.SCALE); LAYOUT_DIGEST lets the Python backend refuse a stale build.
#pragma once

namespace alsals {
constexpr int CHUNK = 4096;
constexpr int CTL_SIZE = 16;
constexpr int VERDICT_SIZE = 8;
constexpr int TABLE_COLS = 8;
namespace Ctl { enum : int { SCALE = 0, SKIP = 1, FALLBACK = 2, LOSS0 = 3, SLOPE = 4, SLOPE_GRAD = 5, S_NEW = 6, H = 7, S = 8, PENDING = 9, UNDO = 10, }; }
namespace Verdict { enum : int { ACCEPT = 0, FINITE = 1, FALLBACK = 2, LOSS0 = 3, LOSS_TRY = 4, SLOPE_USED = 5, PENDING = 6, H_NEW = 7, }; }
namespace Dir { enum : int { MOMENTUM = 0, GRAD = 1, UPDATE = 2, }; }
namespace TableCol { enum : int { W = 0, G = 1, M = 2, V = 3, BACKUP = 4, NUMEL = 5, WD_BITS = 6, SPARE = 7, }; }
constexpr const char* LAYOUT_DIGEST = "abb355a02b550ec1";
}  // namespace alsals
