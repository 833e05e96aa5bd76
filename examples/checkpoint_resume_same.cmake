# ctest script (examples/CMakeLists.txt): PROGRAM trained straight for STEPS
# steps, and again in two parts with --checkpoint (HALF steps, then STEPS
# steps resuming from the checkpoints the first part left), must write the
# same --csv and --history byte for byte (train/trainer.hpp: exact resume).
# ARGS is a |-separated list of the options both runs share.
cmake_policy(SET CMP0007 NEW)
string(REPLACE "|" ";" args "${ARGS}")
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/ckpt)
set(runs "straight|${STEPS}" "first|${HALF}|--checkpoint|${WORK_DIR}/ckpt" "resumed|${STEPS}|--checkpoint|${WORK_DIR}/ckpt")
foreach(run IN LISTS runs)
  string(REPLACE "|" ";" parts "${run}")
  list(GET parts 0 name)
  list(GET parts 1 steps)
  set(extra "")
  list(LENGTH parts count)
  if(count GREATER 2)
    list(SUBLIST parts 2 -1 extra)
  endif()
  set(command ${PROGRAM} ${args} --steps ${steps} ${extra} --checkpoint-every 3 --csv ${WORK_DIR}/${name}.csv
              --history ${WORK_DIR}/${name}_history.csv)
  execute_process(COMMAND ${command} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${command}\n${out}\n${err}")
  endif()
  if(name STREQUAL "resumed" AND NOT out MATCHES "resumed .* at step ${HALF} of ${STEPS}")
    message(FATAL_ERROR "the second part did not resume from the first part's checkpoints:\n${out}")
  endif()
endforeach()
foreach(file .csv _history.csv)
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/straight${file} ${WORK_DIR}/resumed${file}
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "straight${file} and resumed${file} differ (${WORK_DIR})")
  endif()
endforeach()
message("identical: ${STEPS} steps straight and ${HALF} + resume to ${STEPS}")
