#pragma once
// Module header: layers (filled in by its own issue).
