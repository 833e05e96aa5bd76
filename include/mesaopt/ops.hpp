#pragma once
// Module header: ops (filled in by its own issue).
