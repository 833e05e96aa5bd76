#pragma once
// Module header: train (filled in by its own issue).
