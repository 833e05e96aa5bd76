#pragma once
// Placeholder: filled in by the layers issue.
