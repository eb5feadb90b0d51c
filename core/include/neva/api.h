#pragma once
// Everything is compiled with hidden visibility; NEVA_API marks what libneva_core exports, so that
// each interface's typeinfo and vtable have exactly one owner shared by the host and all plugins.
#define NEVA_API __attribute__((visibility("default")))
