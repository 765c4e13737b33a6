/* static-true: a statically linked program that exits 0 at once: the child
 * of the spawn benchmark, so no dynamic loading is counted. */
int main(void) { return 0; }
