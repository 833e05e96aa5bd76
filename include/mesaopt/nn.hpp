#pragma once
// Module header: nn (filled in by its own issue).
