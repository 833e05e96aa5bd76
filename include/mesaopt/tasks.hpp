#pragma once
// Module header: tasks (filled in by its own issue).
