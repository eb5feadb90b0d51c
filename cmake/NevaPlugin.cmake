# neva_add_plugin(NAME <name> KIND <kind> SOURCES <files...> [OUTPUT_DIRECTORY <dir>])
#
# Declares a plugin: one shared library that exports exactly one entry symbol (the Boost.DLL alias
# written by NEVA_PLUGIN in the sources), built with hidden visibility against the same LibTorch and
# libneva_core as the host. The library is named libneva-<kind>-<name>.so and placed in the build
# tree's plugin directory (lib/neva/plugins), where neva-run finds it, unless OUTPUT_DIRECTORY says
# otherwise (tests put deliberately broken plugins in directories of their own).
set(NEVA_PLUGIN_VERSION_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/plugin.map)

function(neva_add_plugin)
  cmake_parse_arguments(ARG "" "NAME;KIND;OUTPUT_DIRECTORY" "SOURCES" ${ARGN})
  if(NOT ARG_NAME OR NOT ARG_KIND OR NOT ARG_SOURCES)
    message(FATAL_ERROR "neva_add_plugin: NAME, KIND and SOURCES are required")
  endif()
  set(target neva-${ARG_KIND}-${ARG_NAME})
  if(NOT ARG_OUTPUT_DIRECTORY)
    set(ARG_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/${NEVA_PLUGIN_SUBDIR})
  endif()
  add_library(${target} MODULE ${ARG_SOURCES})
  target_link_libraries(${target} PRIVATE neva::core)
  set_target_properties(${target} PROPERTIES
    PREFIX "lib"
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  # A plugin resolves every symbol against the host's libraries: never a second LibTorch. (Under
  # clang's sanitizers a library leaves the runtime's symbols to the executable.)
  if(NOT (NEVA_SANITIZE_FLAGS AND CMAKE_CXX_COMPILER_ID STREQUAL "Clang"))
    target_link_options(${target} PRIVATE -Wl,--no-undefined)
  endif()
  target_link_options(${target} PRIVATE -Wl,--version-script=${NEVA_PLUGIN_VERSION_SCRIPT})
  set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS ${NEVA_PLUGIN_VERSION_SCRIPT})
  if(COMMAND neva_target_defaults)
    neva_target_defaults(${target})
  endif()
  if(NOT ARG_OUTPUT_DIRECTORY STREQUAL "${PROJECT_BINARY_DIR}/${NEVA_PLUGIN_SUBDIR}")
    return()
  endif()
  install(TARGETS ${target} LIBRARY DESTINATION ${NEVA_PLUGIN_SUBDIR})
endfunction()
