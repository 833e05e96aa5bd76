#pragma once
// Module header: learners (filled in by its own issue).
