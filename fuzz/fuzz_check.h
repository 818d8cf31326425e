/*
 * fuzz_check.h: FUZZ_CHECK(cond) aborts with the condition, file and line,
 * so libFuzzer reports a failed check as a crash with its input.
 */

#ifndef FUZZ_CHECK_H
#define FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>


#define FUZZ_CHECK(cond)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__,  \
                    #cond);                                                   \
            abort();                                                          \
        }                                                                     \
    } while (0)


#endif /* FUZZ_CHECK_H */
